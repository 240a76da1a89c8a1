"""lnstaging map: map the 17 lymph node stations onto a patient from its CT and anatomy label map."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "map",
        help="map the lymph node stations onto a patient (multi-atlas registration + fusion)",
        description="Register every atlas of an atlas set to the patient's anatomy (batched, torch), fuse the warped "
        "station maps and write the fused station map, the vote fractions, the station centres and a PNG overlay.",
    )
    p.add_argument("--ct", required=True, help="patient CT (NIfTI/NRRD/MHA); its grid is the output grid")
    p.add_argument("--anatomy", required=True,
                   help="anatomy label map with TotalSegmentator 'total' ids (a file or a TotalSegmentator folder)")
    options.add_atlases(p)
    options.add_out(p)
    p.add_argument("--iterations", default=None, help="deformable iterations per level, e.g. 60,40")
    p.add_argument("--no-overlay", action="store_true", help="do not write overlay.png")
    options.add_compute_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from ...errors import UsageError
    from ...mapping.atlas import resolve_atlas_set
    from ...mapping.registration import RegistrationConfig
    from ...mapping.station_mapping import map_stations
    from ...preflight.case import check_mapping_inputs

    cfg = RegistrationConfig(threads=args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                      else os.cpu_count()))
    if args.iterations:
        try:
            its = tuple(int(v) for v in args.iterations.split(","))
        except ValueError:
            raise UsageError(f"--iterations {args.iterations!r}: expected integers separated by commas") from None
        if len(its) != len(cfg.levels_mm):
            raise UsageError(f"--iterations {args.iterations!r}: expected {len(cfg.levels_mm)} values, one per level "
                             f"({', '.join(f'{s:g} mm' for s in cfg.levels_mm)})")
        cfg = RegistrationConfig(threads=cfg.threads, iterations=its)
    options.check_out(args)
    options.apply_runtime(args)
    ct, anatomy = check_mapping_inputs(args.ct, args.anatomy, atlases=args.atlases)
    atlas_set = resolve_atlas_set(args.atlases, allow_missing_stations=True)
    mapping = map_stations(ct, anatomy, atlas_set, device=args.device.torch, config=cfg)
    paths = mapping.write(args.out, None if args.no_overlay else ct)
    out = {"out": str(Path(args.out)), "files": {k: str(v) for k, v in paths.items()}, **mapping.to_dict()}
    lines = [f"station map written to {args.out} ({len(mapping.atlas_ids)} atlases)"]
    for name, st in out["stations"].items():
        if st["flag"] != "absent":
            lines.append(f"  {name:>4}: {st['flag']:<20} agreement {st['agreement']}  centre {st['centre_mm']}")
    options.emit(out, args.json, "\n".join(lines))
    return 0
