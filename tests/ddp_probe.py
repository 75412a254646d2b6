"""Launched by tests/test_distributed.py under torchrun: BAFD training whose hook records, on every rank,
a digest of the weights and masks each time the ranks are synchronised (after creation, after each epoch)."""
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import APFP_train  # noqa: E402
from toolkit import (
    distributed,  # noqa: E402
    hooks,  # noqa: E402
    train_loop,  # noqa: E402
)


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Probe(hooks.MaskHook):
    net = None
    syncs = 0

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.syncs += 1
        record = {"weights": digest(self.net.state_dict().values()),
                  "masks": digest(self.mask.selected[k] for k in sorted(self.mask.selected))}
        out = Path(os.environ["PROBE_OUT"]) / f"rank{distributed.rank()}_sync{self.syncs}.json"
        out.write_text(json.dumps(record))


def make_hook(net, args):
    hook = hooks.bafd_hook(net, args)
    probe = Probe(hook.mask, hook.decay, hook.meter)
    probe.net = net
    return probe


if __name__ == "__main__":
    train_loop.train(APFP_train.get_args_parser().parse_args(), make_hook=make_hook, method="bafd")
