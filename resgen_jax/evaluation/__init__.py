"""Evaluation of class-conditional samples with a small classifier trained on the data set.

:mod:`frechet` fits Gaussians to features and measures the Frechet distance between them;
:mod:`classifier` trains the feature extractor and scores generated images with it (class
agreement and Frechet distance to real held-out images).
"""
