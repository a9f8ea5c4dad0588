import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
