"""The PyTorch peer for bench/bench.sh: the same model, global batch, optimizer and data as a
`lockstep train` job, trained with DistributedDataParallel over gloo in N local processes
(`--ddp N`, what `torchrun --nproc-per-node N` starts) or in one process (`--ddp 0`).

Each DDP rank takes its contiguous share of every global batch, as `lockstep` splits a step
among its workers, and uses cores / N compute threads, as `lockstep train` gives each local
worker. The single process uses every core. The data is MNIST from the IDX files, scaled to
[0, 1] and standardised with (0.1307, 0.3081), held in memory as tensors (no DataLoader), so
that what is measured is the training step. Prints one JSON object: samples/s over the
training time (evaluation excluded, as in lockstep's summary.json), the test accuracy after the
last epoch, and the training time.

    python bench/torch_ref.py --data-dir ../shared/data/mnist --model mlp --ddp 2 --epochs 3
"""

import argparse
import gzip
import json
import os
import socket
import struct
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, count = struct.unpack(">II", data[:8])
    dims = magic & 0xFF
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(data_dir, split, limit):
    images = read_idx(os.path.join(data_dir, f"{split}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(data_dir, f"{split}-labels-idx1-ubyte.gz"))
    if limit:
        images, labels = images[:limit], labels[:limit]
    x = (torch.from_numpy(images.astype(np.float32)) / 255.0 - 0.1307) / 0.3081
    return x.reshape(-1, 1, 28, 28), torch.from_numpy(labels.astype(np.int64))


class MLP(nn.Module):
    """README's `MLP`: Linear layers with ReLU between them."""

    def __init__(self, hidden):
        super().__init__()
        sizes = [784, *hidden, 10]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x):
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = F.relu(x)
        return x


class CNN(nn.Module):
    """README's `CNN`: conv32-conv64-maxpool-fc128-fc10, no dropout."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def build(spec):
    if spec == "cnn":
        return CNN()
    if spec == "mlp":
        return MLP([100, 100])
    if spec.startswith("mlp:"):
        return MLP([int(h) for h in spec[4:].split(":")[0].split(",")])
    raise SystemExit(f"torch_ref.py: unknown model {spec!r} (mlp, mlp:H1,H2,..., cnn)")


def train(rank, world, args, port, result):
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(world, 1)))
    torch.set_num_interop_threads(1)
    if world > 1:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(args.seed)
    x, y = load(args.data_dir, "train", args.train_samples)
    model = build(args.model)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    n = x.shape[0]
    steps = (n + args.batch_size - 1) // args.batch_size
    share = max(1, args.batch_size // max(world, 1))
    trained, seconds = 0, 0.0
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + epoch))
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        for step in range(steps):
            batch = order[step * args.batch_size : (step + 1) * args.batch_size]
            if world > 1:
                batch = batch[rank * share : (rank + 1) * share]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            opt.step()
        if world > 1:
            dist.barrier()
        seconds += time.perf_counter() - start
        trained += n
    if rank == 0:
        tx, ty = load(args.data_dir, "t10k", 0)
        net = model.module if world > 1 else model
        with torch.no_grad():
            correct = sum(
                (net(tx[i : i + 1000]).argmax(1) == ty[i : i + 1000]).sum().item()
                for i in range(0, tx.shape[0], 1000)
            )
        result.update(
            samples_per_second=trained / seconds,
            test_accuracy=correct / tx.shape[0],
            train_seconds=seconds,
            torch=torch.__version__,
            threads=torch.get_num_threads(),
        )
    if world > 1:
        dist.destroy_process_group()


def worker(rank, world, args, port, queue):
    result = {}
    train(rank, world, args, port, result)
    if rank == 0:
        queue.put(result)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--model", default="mlp")
    p.add_argument("--ddp", type=int, default=2, help="DDP processes (0: one plain process)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--train-samples", type=int, default=0, help="first N training images (0: all)")
    args = p.parse_args()
    if args.ddp <= 1:
        result = {}
        train(0, 1, args, 0, result)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        mp.spawn(worker, args=(args.ddp, args, port, queue), nprocs=args.ddp, join=True)
        result = queue.get()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
