"""The continual driver: a recipe of SFT stages, run one after the other with GeRe replay."""
