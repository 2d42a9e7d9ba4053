"""Two CPU processes under torchrun (gloo): DistributedDataParallel training ends with the
same weights and the same psi on both ranks, and only rank 0 writes the checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from models.store.checkpoint import read_metadata

REPO = Path(__file__).resolve().parents[3]

RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from safetensors.torch import save_file
    from models.train.config import TrainConfig
    from models.train.loop import train

    data, out, report = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    cfg = TrainConfig(data=data, out=out, arch="preact_resnet", depth=8, width=4, batch_size=4,
                      epochs=2, lr=0.05, schedule="onecycle", robust=True, ara_n=0, progress=False,
                      seed=7, device="cpu")
    run = train(cfg)
    rank = run.info.rank
    state = {k: v.contiguous() for k, v in run.net.state_dict().items()}
    save_file(state, f"{report}.rank{rank}.safetensors")
    with open(f"{report}.rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "world": run.info.world, "S": run.psi.S, "psi": run.psi.psi,
                   "steps": run.global_step, "history": run.history}, f)
    """
)


def test_two_gloo_ranks_end_with_identical_weights_and_psi(tmp_path, tiny_medmnist):
    data = tiny_medmnist(tmp_path / "tiny.npz", 40, 8, 8)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "ddp.safetensors"
    report = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "AEX_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            str(data),
            str(out),
            str(report),
        ],
        cwd=tmp_path,
        env={**env, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    infos = [json.loads((tmp_path / f"report.rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world"] for i in infos] == [2, 2]
    # 40 images over 2 ranks, 4 per rank per step: 5 steps per epoch, 2 epochs.
    assert infos[0]["steps"] == infos[1]["steps"] == 10
    assert infos[0]["S"] == infos[1]["S"] and infos[0]["psi"] == infos[1]["psi"]
    assert infos[0]["S"] > 0  # psi moved (CE of this easy set falls below its target)
    # Epoch metrics are averages over both ranks (timings aside).
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in h]
    assert strip(infos[0]["history"]) == strip(infos[1]["history"])
    w0 = load_file(str(tmp_path / "report.rank0.safetensors"))
    w1 = load_file(str(tmp_path / "report.rank1.safetensors"))
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    # The ranks really trained: weights moved away from the seed's initial ones.
    from models.nn.registry import create_model

    torch.manual_seed(7)
    init = create_model(
        "preact_resnet",
        depth=8,
        width=4,
        in_channels=1,
        num_classes=2,
        input_size=28,
        activation="hhrelu",
        zero_init_residual=False,
    ).state_dict()
    assert not torch.equal(init["pipe.0.weight"], w0["pipe.0.weight"])
    # Rank 0 alone wrote the checkpoint, with the same weights and psi.
    meta = read_metadata(out)
    assert meta.psi_state["S"] == infos[0]["S"]
    assert meta.extra == {} and meta.metrics["epochs_done"] == 2
    assert read_metadata(out.with_name("ddp.resume.safetensors")).extra["resume"]["world_size"] == 2
