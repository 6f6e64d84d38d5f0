"""Reproduce the end-to-end protocol fixture on the real clips it was made from.

The fixture `tests/fixtures/e2e_protocol.*` records what the MM-Diffusion evaluator computes
(with formula weights, see tests/formula_weights.py) for 15 "real" clips of
`aist_video0_long.mp4` and 15 "fake" clips of `aist_video1_long.mp4` (windows at a 16-frame
stride). The clips are not ours to commit, so this is a check script rather than a test:

    python benchmarks/eval_e2e.py --media DIR_WITH_THE_TWO_MP4S

It checks the clip windows and audio times, the decoded 64×64 clips and the audio windows
bit for bit, then features and FVD / KVD / FAD for both letterbox antialias settings, in process
and through `rflav eval --clip-stride 16 --num-clips 15` with weight files in the original layouts,
and prints our numbers next to the evaluator's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import formula_weights  # noqa: E402

from rflav_cli.metrics import protocol as P  # noqa: E402
from rflav_cli.metrics.audioclip import AudioCLIPAudio  # noqa: E402
from rflav_cli.metrics.i3d import InceptionI3d  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
TOLERANCE = {"fvd": 1e-3, "kvd": 1e-3, "fad": 1e-4}  # relative, README §4 of the fixture


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{(': ' + detail) if detail else ''}")
    return ok


def via_cli(real_file: Path, fake_file: Path, meta: dict) -> bool:
    """`rflav eval --clip-stride 16 --num-clips 15` on the same files, with the formula weights written
    in the original checkpoint layouts."""
    import subprocess
    import tempfile

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, src in (("real", real_file), ("fake", fake_file)):
            (tmp / name).mkdir()
            (tmp / name / src.name).symlink_to(src.resolve())
        torch.save(
            formula_weights.formula_state_dict(FIXTURES / "i3d_keys.tsv"), tmp / "i3d_pretrained_400.pt"
        )
        torch.save(
            formula_weights.formula_state_dict(FIXTURES / "audioclip_audio_keys.tsv"),
            tmp / "AudioCLIP-Full-Training.pt",
        )
        for antialias, key in (("on", "metric"), ("off", "metric_noaa")):
            cmd = [
                sys.executable,
                "-m",
                "rflav_cli",
                "eval",
                "--real",
                str(tmp / "real"),
                "--fake",
                str(tmp / "fake"),
                "--clip-stride",
                "16",
                "--num-clips",
                "15",
                "--letterbox-antialias",
                antialias,
                "--device",
                "cpu",
                "--i3d-weights",
                str(tmp / "i3d_pretrained_400.pt"),
                "--audioclip-weights",
                str(tmp / "AudioCLIP-Full-Training.pt"),
                "--json",
            ]
            run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if run.returncode != 0:
                ok &= check(f"rflav eval (antialias {antialias})", False, run.stderr.strip().splitlines()[-1])
                continue
            ours = json.loads(run.stdout)
            for metric in ("fvd", "kvd", "fad"):
                rel = abs(ours[metric] / meta[key][metric] - 1)
                ok &= check(
                    f"rflav eval {metric.upper()} antialias={antialias}",
                    rel <= TOLERANCE[metric],
                    f"ours {ours[metric]:.9g}, evaluator {meta[key][metric]:.9g}, relative {rel:.2e}",
                )
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--media",
        type=Path,
        required=True,
        help="folder holding aist_video0_long.mp4 and aist_video1_long.mp4",
    )
    p.add_argument("--skip-features", action="store_true", help="skip the in-process feature check")
    p.add_argument("--skip-cli", action="store_true", help="skip the `rflav eval` run")
    args = p.parse_args()
    torch.set_num_threads(2)
    tensors = load_file(str(FIXTURES / "e2e_protocol.safetensors"))
    meta = json.loads((FIXTURES / "e2e_protocol.json").read_text())
    real_file, fake_file = args.media / "aist_video0_long.mp4", args.media / "aist_video1_long.mp4"
    ok = True

    # Media side: windows, times, decoded clips and audio, bit for bit.
    real_clips = P.enumerate_clips([real_file], clip_stride=16)
    expected = meta["sets"]["real"]["clips"]
    ok &= check(
        "clip windows",
        [c.frames for c in real_clips]
        == [tuple(range(e["frames"][0], e["frames"][1] + 1)) for e in expected],
    )
    ok &= check(
        "clip times (float32)",
        [c.start_t for c in real_clips] == [e["start_t"] for e in expected]
        and [c.end_t for c in real_clips] == [e["end_t"] for e in expected],
    )
    videos = P.read_clip_videos(real_clips, antialias=True)
    ok &= check(
        "64x64 clips, antialias on",
        [sha256(v.numpy()) for v in videos] == [e["video_uint8_sha256"] for e in expected]
        and torch.equal(videos[0], tensors["real.clip0_video_uint8"]),
    )
    no_aa = P.read_clip_videos(real_clips[:4], antialias=False)
    ok &= check(
        "64x64 clips, antialias off",
        [sha256(v.numpy()) for v in no_aa] == [e["video_uint8_sha256_noaa"] for e in expected[:4]],
    )
    duration = P.moviepy_duration(real_file)
    ok &= check(
        "container duration",
        duration == meta["sets"]["real"]["moviepy_duration"],
        f"{duration} vs {meta['sets']['real']['moviepy_duration']} (depends on the ffmpeg build)",
    )
    waves = [(P.clip_audio(c) * 32768).astype("<i2") for c in real_clips]
    ok &= check(
        "audio windows",
        [sha256(w) for w in waves] == [e["audio_int16_sha256"] for e in expected]
        and np.array_equal(waves[2], tensors["real.clip2_audio_int16"].numpy()),
    )

    if not args.skip_features:
        i3d = InceptionI3d().eval()
        i3d.load_state_dict(formula_weights.formula_state_dict(FIXTURES / "i3d_keys.tsv"))
        audio_net = AudioCLIPAudio()
        audio_net.load_state_dict(
            {
                k.removeprefix("audio."): v
                for k, v in formula_weights.formula_state_dict(FIXTURES / "audioclip_audio_keys.tsv").items()
            }
        )
        features = {}
        began = time.time()
        for name, path in (("real", real_file), ("fake", fake_file)):
            clips = P.enumerate_clips([path], clip_stride=16)
            batches = P.loader_batches(len(clips), 15)
            for antialias in (True, False):
                v, a = P.compute_features(clips, batches, 15, i3d, audio_net, antialias=antialias)
                key = "i3d_logits" if antialias else "i3d_logits_noaa"
                dv = (torch.as_tensor(v) - tensors[f"{name}.{key}"]).abs().max().item()
                da = (torch.as_tensor(a) - tensors[f"{name}.audio_emb"]).abs().max().item()
                print(
                    f"     {name} antialias={antialias}: I3D max diff {dv:.2e}, AudioCLIP max diff {da:.2e} "
                    f"({time.time() - began:.0f} s)"
                )
                features[(name, antialias)] = (v, a)
        for antialias, key in ((True, "metric"), (False, "metric_noaa")):
            ours = P.mmdiffusion_scores(
                features[("fake", antialias)][0],
                features[("real", antialias)][0],
                features[("fake", antialias)][1],
                features[("real", antialias)][1],
            )
            theirs = meta[key]
            for metric in ("fvd", "kvd", "fad"):
                rel = abs(ours[metric] / theirs[metric] - 1)
                ok &= check(
                    f"{metric.upper()} antialias={'on' if antialias else 'off'}",
                    rel <= TOLERANCE[metric],
                    f"ours {ours[metric]:.9g}, evaluator {theirs[metric]:.9g}, relative {rel:.2e}",
                )
    if not args.skip_cli:
        ok &= via_cli(real_file, fake_file, meta)
    print("all checks passed" if ok else "some checks FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
