"""Scripts that reproduce the claims in the README: each runs its experiments and writes its
table to `experiments/claims/results/`."""
