"""Training the neural router from label datasets: `collab-decode train-router DATASET --out DIR`."""
