"""Benchmark: STAL against its backbone alone on the same clips (time per clip, FLOPs, achieved FLOP/s).

A large matrix product timed in the same run is the reference for what the device can do; absolute times on
shared machines are noise, ratios are not. Also checks that the part networks and STAL issue the same number
of torch calls whatever the number of parts and frames, i.e. there is no Python loop over either.

    python bench/model.py --backbone bninception --clips 4 --seq-len 8
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stal_ray.model.stal import STAL  # noqa: E402
from stal_ray.objective import STALObjective  # noqa: E402

PAPER_SIZE = {"bninception": (224, 224), "resnet50": (256, 128), "tiny": (64, 32)}
GOAL = 0.70  # STAL's achieved FLOP/s over the backbone's, forward+backward


class CallCounter(TorchFunctionMode):
    """Counts torch function calls: equal counts for 1 and R parts mean one batched op per layer."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(step, device: torch.device, steps: int, warm_up: int) -> list[float]:
    """Seconds of each of `steps` calls of step() after `warm_up` untimed ones, the device synchronised."""
    for _ in range(warm_up):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def timed(step, device: torch.device, repeats: int) -> float:
    """Median seconds of `step()` after one warm-up run."""
    return statistics.median(step_times(step, device, repeats, warm_up=1))


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Each gradient (input, weight) of a convolution costs what its forward does.

    torch's own formula counts the weight gradient as if groups were 1, which inflates grouped convolutions
    (the part networks) by up to the number of groups.
    """
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def flops_of(step) -> int:
    mapping = {torch.ops.aten.convolution_backward: conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step()
    return counter.get_total_flops()


def matmul_reference(device: torch.device, repeats: int, autocast) -> dict:
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device) for _ in range(2))

    def step():
        with autocast():
            return a @ b

    seconds = timed(step, device, repeats)
    flops = 2 * n**3
    return {"name": f"matmul {n}x{n}", "seconds": seconds, "flops": flops, "flop_per_s": flops / seconds}


def torch_calls(run) -> int:
    with torch.no_grad(), CallCounter() as counter:
        run()
    return counter.calls


def loop_check(backbone: str, seq_len: int, size: tuple[int, int]) -> dict:
    """Torch calls of the part networks for 1 vs 6 parts, and of STAL for T vs 2T frames."""
    model = STAL(backbone, seq_len=seq_len, image_size=size, feature_dim=64).eval()
    channels = model.backbone.low_channels
    parts = {r: model.backbone.part_networks(r, 64).eval() for r in (1, 6)}
    part_calls = {r: torch_calls(lambda r=r: parts[r](torch.randn(2, r, channels, 8, 8))) for r in parts}
    longer = STAL(backbone, seq_len=2 * seq_len, image_size=size, feature_dim=64).eval()
    stal_calls = {
        seq_len: torch_calls(lambda: model(torch.randn(1, seq_len, 3, *size))),
        2 * seq_len: torch_calls(lambda: longer(torch.randn(1, 2 * seq_len, 3, *size))),
    }
    return {
        "part_network_calls": part_calls,
        "stal_calls": stal_calls,
        "no_loop_over_parts": part_calls[1] == part_calls[6],
        "no_loop_over_frames": len(set(stal_calls.values())) == 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="bninception", choices=sorted(PAPER_SIZE))
    parser.add_argument("--clips", type=int, default=4, help="clips per batch (P=clips/2 identities, K=2)")
    parser.add_argument("--seq-len", type=int, default=8, help="T frames per clip (paper: 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--out", default="bench/results/model.json")
    args = parser.parse_args()
    if args.clips < 4 or args.clips % 2:
        parser.error("--clips must be an even number >= 4 (P identities x K=2 clips, P >= 2)")

    torch.manual_seed(0)
    device = torch.device(args.device)
    size = PAPER_SIZE[args.backbone]

    def autocast():
        enabled = args.precision == "bf16"
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)

    labels = torch.arange(args.clips // 2, device=device).repeat_interleave(2)
    model = STAL(args.backbone, num_classes=625, seq_len=args.seq_len, image_size=size).to(device).train()
    objective = STALObjective()
    clips = torch.randn(args.clips, args.seq_len, 3, *size, device=device)
    frames = clips.flatten(0, 1)

    def backbone_forward():
        with torch.no_grad(), autocast():
            model.backbone(frames)

    def backbone_train():
        model.zero_grad(set_to_none=True)
        with autocast():
            g = model.backbone(frames)
        g.float().square().mean().backward()

    def stal_forward():
        with torch.no_grad(), autocast():
            model(clips)

    def stal_train():
        model.zero_grad(set_to_none=True)
        with autocast():
            out = model(clips)
        objective(out, labels).total.backward()

    reference = matmul_reference(device, args.repeats, autocast)
    rows = []
    for name, step in [
        ("backbone forward", backbone_forward),
        ("STAL forward", stal_forward),
        ("backbone fwd+bwd", backbone_train),
        ("STAL fwd+bwd", stal_train),
    ]:
        flops = flops_of(step)
        seconds = timed(step, device, args.repeats)
        rows.append({
            "name": name,
            "ms_per_clip": 1000 * seconds / args.clips,
            "gflop_per_clip": flops / args.clips / 1e9,
            "flop_per_s": flops / seconds,
            "of_matmul": flops / seconds / reference["flop_per_s"],
        })
    loops = loop_check(args.backbone, min(args.seq_len, 4), size)
    by_name = {row["name"]: row for row in rows}
    ratio = by_name["STAL fwd+bwd"]["flop_per_s"] / by_name["backbone fwd+bwd"]["flop_per_s"]

    cpu = f"cpu x{torch.get_num_threads()}"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    print(f"STAL model benchmark: {args.backbone} at {size[0]}x{size[1]}, {args.clips} clips x "
          f"T={args.seq_len}, {args.precision}, {device_name}")
    print(f"reference {reference['name']}: {reference['flop_per_s'] / 1e9:.1f} GFLOP/s")
    print(f"{'':<18}{'ms/clip':>10}{'GFLOP/clip':>12}{'GFLOP/s':>10}{'of matmul':>11}")
    for row in rows:
        print(f"{row['name']:<18}{row['ms_per_clip']:>10.1f}{row['gflop_per_clip']:>12.2f}"
              f"{row['flop_per_s'] / 1e9:>10.1f}{row['of_matmul']:>10.0%}")
    verdict = "PASS" if ratio >= GOAL else "FAIL"
    print(f"STAL / backbone achieved FLOP/s (fwd+bwd): {ratio:.0%} (goal >= {GOAL:.0%}): {verdict}")
    parts, frames = loops["part_network_calls"], list(loops["stal_calls"].items())
    print(f"torch calls in the part networks, 1 vs 6 parts: {parts[1]} vs {parts[6]} -> "
          f"{'no' if loops['no_loop_over_parts'] else 'a'} loop over parts")
    print(f"torch calls in STAL, T={frames[0][0]} vs T={frames[1][0]}: {frames[0][1]} vs {frames[1][1]} -> "
          f"{'no' if loops['no_loop_over_frames'] else 'a'} loop over frames")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"config": vars(args), "device": device_name, "reference": reference, "rows": rows,
              "stal_over_backbone_flop_per_s": ratio, "goal": GOAL, "loops": loops}
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
