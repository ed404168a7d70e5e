"""The GeRe paper, as model cards cite it: its title, arXiv id and BibTeX (from the official repository's README).

TRL's trainers read a ``_paper`` mapping of exactly these keys for the cards they write
(``trl.trainer.base_trainer._BaseTrainer.create_model_card``); :class:`~gere_hf.trainer.GeReSFTTrainer` sets it, and
:class:`~gere_hf.trainer.GeReTrainer` and the recipe runner's per-stage cards cite the same entry.
"""

from __future__ import annotations

GERE_TITLE = "GeRe: Towards Efficient Anti-Forgetting in Continual Learning of LLM via General Samples Replay"
GERE_ARXIV_ID = "2508.04676"
# As the official README (github.com/Qznan/GeRe, commit 34d74f5) gives it.
GERE_BIBTEX = """\
@misc{zhang2025gereantiforget,
      title={GeRe: Towards Efficient Anti-Forgetting in Continual Learning of LLM via General Samples Replay},
      author={Yunan Zhang and Shuoran Jiang and Mengchen Zhao and Yuefeng Li and Yang Fan and Xiangping Wu and Qingcai Chen},
      year={2025},
      eprint={2508.04676},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2508.04676},
}"""

GERE_PAPER = {"title": GERE_TITLE, "id": GERE_ARXIV_ID, "citation": GERE_BIBTEX}
"""What TRL's ``_BaseTrainer`` reads as ``_paper`` (title, arXiv id, BibTeX)."""

GERE_TAGS = ("gere", "continual-learning", "general-sample-replay")
"""Hub tags of every model gere_hf trains with replay."""


def paper_url() -> str:
    """The paper's page on the Hugging Face Hub (what TRL's cards link to)."""
    return f"https://huggingface.co/papers/{GERE_ARXIV_ID}"


def method_sentence() -> str:
    """The sentence TRL's card template writes for a method with a paper, for GeRe."""
    return f"This model was trained with GeRe, a method introduced in [{GERE_TITLE}]({paper_url()})."


def citation_markdown() -> str:
    """A 'Citations' section with GeRe's BibTeX, as TRL's cards write one."""
    return f"## Citations\n\nCite GeRe as:\n\n```bibtex\n{GERE_BIBTEX}\n```\n"


__all__ = ["GERE_ARXIV_ID", "GERE_BIBTEX", "GERE_PAPER", "GERE_TAGS", "GERE_TITLE", "citation_markdown",
           "method_sentence", "paper_url"]
