"""The demo: a synthetic churn table, a scikit-learn churn model, all-MiniLM-L6-v2 and a small
digits CNN, each optimized with the seed's request on the embedded defaults."""
