"""Pure math: noise-gap score, similarity, ROC metrics, SolidMark key distance. Imports nothing of the project."""
