import torch

# the suite runs tiny models: one thread avoids oversubscription on small CI machines
torch.set_num_threads(1)
