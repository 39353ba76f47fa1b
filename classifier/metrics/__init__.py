"""The scores of a model on the test split, the files and figures they go to, and the models table."""
