"""Faults of the reliability campaign (docs/reliability.md), each against a real ``genserve serve``
subprocess on loopback, under the mixed load of bench/reliability.py:

- ``crash``: a request that crashes the model. The server runs under bench/fault_serve.py, whose
  PixelCNN raises on a batch holding the poison image; ``--poison`` such requests (one every
  ``--every-s``) go out among ``--clients`` loops of ordinary load. Each poisoned request must get
  a JSON 500 with its request id, every other request its 200, and the server must serve on.
- ``full-disk``: a full disk while calibrating. In a private mount namespace (``unshare -Urm``, no
  root needed) the model store lives on a small tmpfs; the model is calibrated, the server started
  on the store and loaded, the tmpfs filled to a few KiB short of a new model.json, and ``genserve
  calibrate`` run again: it must exit with a clear error, model.json must be byte-identical, no
  temporary file left, and the server must answer every request (an admin reload finds nothing
  changed). Then the disk is freed, the calibration rerun and reloaded.

    python bench/reliability_faults.py crash --json /tmp/crash.json
    python bench/reliability_faults.py full-disk --json /tmp/full-disk.json
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reliability as rel
from fault_serve import POISON

logger = logging.getLogger("bench.reliability_faults")
HERE = Path(__file__).resolve()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("campaign", choices=("crash", "full-disk"))
    p.add_argument("--clients", type=int, default=8, help="loops of ordinary mixed load")
    p.add_argument("--poison", type=int, default=40, help="crash: poisoned requests")
    p.add_argument("--every-s", type=float, default=0.5, help="crash: seconds between poisoned requests")
    p.add_argument("--disk-kib", type=int, default=1024, help="full-disk: size of the tmpfs holding the store")
    p.add_argument("--threads", type=int, default=1, help="GENSERVE_TORCH_THREADS of the server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--inside", type=Path, help=argparse.SUPPRESS)  # full-disk: the run inside the namespace
    args = p.parse_args(argv)
    if min(args.clients, args.poison, args.disk_kib) < 1 or args.every_s <= 0:
        p.error("counts must be at least 1 and durations positive")
    return args


# ---- a request that crashes the model ---------------------------------------------------------------


def png_b64(image: Any) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def crash_campaign(args: argparse.Namespace, server: rel.Server, folder: Path) -> dict[str, Any]:
    import httpx
    import numpy as np

    load = rel.Load(server.url, rel.image_shape(folder))
    loops = [asyncio.create_task(load.loop(args.seed + i)) for i in range(args.clients)]
    poison = png_b64(np.full(rel.image_shape(folder), POISON, dtype=np.uint8))
    answers = []
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        for _ in range(args.poison):
            await asyncio.sleep(args.every_s)
            r = await client.post("/score", json={"model": rel.MODEL, "images": [poison]})
            answers.append({"status": r.status_code, "body": r.json(), "request_id": r.headers.get("x-request-id")})
        await asyncio.sleep(args.every_s)
        load.stop.set()
        await asyncio.gather(*loops)
        after = await client.post("/score", json={"model": rel.MODEL, "images": [load.image(random.Random(1))]})
        ready = (await client.get("/readyz")).status_code
    log = server.log.read_text(errors="replace")
    shared = [json.loads(line) for line in log.splitlines() if "running them one at a time" in line]
    sizes = [int(m.group(1)) for e in shared if (m := re.search(r"a batch of (\d+) jobs", e.get("message", "")))]
    return {
        "poisoned": len(answers),
        "poisoned_by_status": dict(Counter(str(a["status"]) for a in answers)),
        "poisoned_body_example": next((a["body"] for a in answers if a["status"] != 200), None),
        "poisoned_with_request_id": sum(1 for a in answers if a["body"].get("request_id") == a["request_id"]),
        "batches_that_failed_and_were_rerun_one_at_a_time": len(shared),
        "requests_batched_with_a_poisoned_one": sum(sizes) - len(sizes),
        "batch_failure_logged": shared[0].get("message") if shared else None,
        "other_requests": rel.phase_summary(load.records),
        "after": {"score": after.status_code, "readyz": ready},
    }  # fmt: skip


# ---- a full disk while calibrating ------------------------------------------------------------------


def calibrate(folder: Path, data: Path, fpr: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "models.tools.cli", "calibrate", "--model", str(folder), "--data", f"npz:{data}",
           "--fpr", str(fpr), "--no-progress"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=rel.ROOT, capture_output=True, text=True, timeout=600)
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    return {"exit": done.returncode, "seconds": round(time.perf_counter() - start, 1), "error": errors[-1:]}


def fill(disk: Path, leave_kib: int) -> int:
    """Fill ``disk`` with 4 KiB files until the kernel says ENOSPC, then free ``leave_kib``; the files."""
    n = 0
    try:
        while True:
            (disk / f"filler-{n}").write_bytes(b"\0" * 4096)
            n += 1
    except OSError as e:
        logger.info("disk full after %d filler files: %s", n, e)
    for i in range(n - 1, max(-1, n - 1 - leave_kib // 4), -1):
        (disk / f"filler-{i}").unlink()
    return n


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def reload(server: rel.Server) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        r = await client.post(f"/admin/models/{rel.MODEL}/reload", headers={"X-Admin-Key": rel.ADMIN_KEY})
    body = r.json()
    return {"status": r.status_code, "result": body.get("result"), "detail": body.get("detail")}


async def full_disk_steps(args: argparse.Namespace, server: rel.Server, folder: Path, data: Path) -> dict[str, Any]:
    load = rel.Load(server.url, rel.image_shape(folder))
    loops = [asyncio.create_task(load.loop(args.seed + i)) for i in range(args.clients)]
    await asyncio.sleep(5)
    meta = folder / "model.json"
    before = digest(meta)
    fillers = fill(folder.parent.parent, leave_kib=max(4, meta.stat().st_size // 1024 // 2))
    disk = os.statvfs(folder)
    free_kib = disk.f_bavail * disk.f_frsize // 1024
    failed = await asyncio.to_thread(calibrate, folder, data, 0.1)
    left = sorted(p.name for p in folder.iterdir())
    intact = digest(meta) == before
    during = await reload(server)
    for f in folder.parent.parent.glob("filler-*"):
        f.unlink()
    again = await asyncio.to_thread(calibrate, folder, data, 0.1)
    after = await reload(server)
    await asyncio.sleep(5)
    load.stop.set()
    await asyncio.gather(*loops)
    return {
        "filler_files": fillers, "model_json_bytes": len(meta.read_bytes()), "free_kib_at_the_write": free_kib,
        "calibrate_on_full_disk": failed, "model_json_byte_identical": intact,
        "files_in_model_folder_after": left, "reload_while_full": during,
        "calibrate_with_space": again, "reload_after": after,
        "target_fpr_after": json.loads(meta.read_text())["calibration"]["target_fpr"],
        "load": rel.phase_summary(load.records),
    }  # fmt: skip


def full_disk_inside(args: argparse.Namespace) -> dict[str, Any]:
    """The run in the private mount namespace: ``args.inside`` is a fresh folder to mount the tmpfs on."""
    import numpy as np

    disk = args.inside
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.disk_kib}k", "tmpfs", str(disk)], check=True)
    data = disk.parent / "valid.npz"
    rng = np.random.default_rng(args.seed)
    np.savez(data, images=rng.integers(0, 64, size=(60, 8, 8), dtype=np.uint8))
    folder = disk / "store" / rel.MODEL
    rel.tiny_version(folder, args.seed)
    first = calibrate(folder, data, 0.05)
    server = rel.start_server(args, folder.parent, disk.parent / "server.log")
    try:
        result = asyncio.run(full_disk_steps(args, server, folder, data))
    finally:
        code = rel.stop_server(server)
    return {"disk_kib": args.disk_kib, "first_calibration": first, **result, "server_exit": code}


def full_disk(args: argparse.Namespace) -> dict[str, Any]:
    if not shutil.which("unshare"):
        return {"skipped": "no unshare(1): cannot make a private tmpfs without root"}
    with tempfile.TemporaryDirectory(prefix="genserve-full-disk-") as tmp:
        disk = Path(tmp) / "disk"
        disk.mkdir()
        out = Path(tmp) / "result.json"
        cmd = ["unshare", "-Urm", sys.executable, str(HERE), "full-disk", "--inside", str(disk), "--json", str(out),
               "--clients", str(args.clients), "--disk-kib", str(args.disk_kib),
               "--threads", str(args.threads)]  # fmt: skip
        done = subprocess.run(cmd, cwd=rel.ROOT, capture_output=True, text=True, timeout=900)
        if done.returncode != 0 or not out.is_file():
            return {"failed": done.returncode, "stderr": done.stderr.splitlines()[-10:]}
        return dict(json.loads(out.read_text()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.inside is not None:
        args.json.write_text(json.dumps(full_disk_inside(args)) + "\n")
        return 0
    if args.campaign == "full-disk":
        result = full_disk(args)
    else:
        with tempfile.TemporaryDirectory(prefix="genserve-crash-") as tmp:
            folder = Path(tmp) / "store" / rel.MODEL
            rel.tiny_version(folder, args.seed)
            launcher = [sys.executable, str(HERE.parent / "fault_serve.py")]
            server = rel.start_server(args, folder.parent, Path(tmp) / "server.log", launcher)
            try:
                result = asyncio.run(crash_campaign(args, server, folder))
            finally:
                code = rel.stop_server(server)
            result["server_exit"] = code
    text = json.dumps({"campaign": args.campaign, "clients": args.clients, **result}, indent=2)
    print(text)  # noqa: T201 - the campaign's output
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
