"""TransReID ViT-B stride 12 (SIE, JPM), 256x128, CPU: explicit softmax attention vs
torch.nn.functional.scaled_dot_product_attention, batch 1 and 32 (random weights).

    python benchmarks/bench_vit.py [--threads 2] [--repeats 3] [--batch_sizes 1,32]

Explicit attention is what training and AMG scoring need (the maps and their gradients); inference needs
no map, so transreid.test uses the faster path when the features agree (checked here, <= 1e-5).
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from toolkit import cli  # noqa: E402
from toolkit.latency import median_latencies  # noqa: E402
from transreid.config import load_config  # noqa: E402
from transreid.model import make_model  # noqa: E402


def main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(str(ROOT / "transreid/configs/Market/vit_transreid_stride.yml"), [])
    torch.manual_seed(0)
    model = make_model(cfg, 751, 6).eval()
    print(f"ViT-B stride 12, {model.base.patch_embed.num_patches} patches, {torch.get_num_threads()} threads")
    for b in args.batch_sizes:
        x = torch.randn(b, 3, 256, 128)
        with torch.inference_mode():
            model.use_fused_attention(False)
            explicit = model(x)
            model.use_fused_attention(True)
            fused = model(x)
            diff = (explicit - fused).abs().max().item()

            def run(fused: bool):
                model.use_fused_attention(fused)
                model(x)
            ms = median_latencies({"explicit": lambda: run(False), "sdpa": lambda: run(True)}, args.warmup,
                                  args.repeats)
        print(f"batch {b:3d}: explicit {ms['explicit']:9.1f} ms  sdpa {ms['sdpa']:9.1f} ms  "
              f"sdpa speed-up {ms['explicit'] / ms['sdpa']:.2f}x  max feature difference {diff:.1e}")


if __name__ == "__main__":
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch_sizes", type=cli.positive_int_list, default=[1, 32])
    p.add_argument("--threads", type=cli.positive_int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--warmup", type=cli.nonnegative_int, default=1)
    p.add_argument("--repeats", type=cli.positive_int, default=3, help="timed runs per variant (median)")
    main(p.parse_args())
