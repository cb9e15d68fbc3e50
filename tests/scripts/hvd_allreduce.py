"""Run under horovodrun: each rank contributes rank+1; prints the allreduced sum and broadcast."""

import horovod.torch as hvd
import torch

hvd.init()
total = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum)
value = hvd.broadcast(torch.tensor([float(hvd.rank() * 10 + 7)]), root_rank=1)
# A sparse embedding gradient through DistributedOptimizer (allgather path) and a dense one.
torch.manual_seed(0)
table = torch.nn.Embedding(10, 2, sparse=True)
linear = torch.nn.Linear(2, 1)
sparse_opt = hvd.DistributedOptimizer(
    torch.optim.SparseAdam(table.parameters(), lr=0.1), named_parameters=table.named_parameters()
)
dense_opt = hvd.DistributedOptimizer(
    torch.optim.Adam(linear.parameters(), lr=0.1), named_parameters=linear.named_parameters()
)
ids = torch.tensor([hvd.rank()])  # rank 0 touches row 0, rank 1 row 1
linear(table(ids)).sum().backward()
sparse_opt.step()
dense_opt.step()
checksum = hvd.allreduce(table.weight.detach().sum(), op=hvd.Sum)
print(f"rank={hvd.rank()} size={hvd.size()} sum={total.item():g} bcast={value.item():g}")
print(
    f"rank={hvd.rank()} weights_checksum={checksum.item():.6f} mine={table.weight.sum().item():.6f}"
)
