"""The error of a recipe that cannot run, raised throughout the continual driver (defined here, below every module
that raises it; :mod:`gere_hf.continual.recipe` exports it)."""


class RecipeError(ValueError):
    """A recipe that cannot run. The message names the problem and the fix."""
