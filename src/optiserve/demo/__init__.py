"""What the demo (cli/demo.py) and the README's examples use: a scikit-learn churn model on
the synthetic churn table, all-MiniLM-L6-v2 and a small digits CNN (models.py), a sentence
corpus, the serving walk-through (serving.py) and the example files (examples.py)."""
