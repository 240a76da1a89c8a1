"""lnstaging map: map the 17 lymph node stations onto a patient, by atlas registration (CT + anatomy), by the station
network (CT alone) or both (with their per-station agreement)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "map",
        help="map the lymph node stations onto a patient (atlas registration, station network, or both)",
        description="--method atlas (default): register every atlas of an atlas set to the patient's anatomy "
        "(batched, torch) and fuse the warped station maps. --method network: the station network maps the "
        "stations from the CT alone (no anatomy). --method both: both, the atlas map is written and the per-station "
        "Dice between the two maps is reported (network map in OUT/network/). Writes the station map, the vote "
        "fractions (network: probabilities), the station centres and a PNG overlay.",
    )
    p.add_argument("--ct", required=True, help="patient CT (NIfTI/NRRD/MHA); its grid is the output grid")
    p.add_argument("--anatomy", default=None,
                   help="anatomy label map with TotalSegmentator 'total' ids (a file or a TotalSegmentator folder); "
                        "needed by --method atlas and both")
    options.add_station_method(p)
    options.add_atlases(p)
    options.add_out(p)
    p.add_argument("--iterations", default=None, help="deformable iterations per level, e.g. 60,40")
    p.add_argument("--no-overlay", action="store_true", help="do not write overlay.png")
    options.add_compute_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from ...errors import UsageError
    from ...mapping.registration import RegistrationConfig
    from ...stationnet.method import check_method, map_case, needs_anatomy, needs_network

    method = check_method(args.method)
    if needs_anatomy(method) and not args.anatomy:
        raise UsageError(f"--method {method} needs --anatomy (the atlas registration is guided by the anatomy); "
                         "--method network maps from the CT alone")
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
    model = None
    if needs_network(method):
        from ...stationnet.model import load_station_model

        model = load_station_model(args.station_model, args.device.torch)  # verified before the images are read
    atlas_set = anatomy = None
    if needs_anatomy(method):
        from ...mapping.atlas import resolve_atlas_set
        from ...preflight.case import check_mapping_inputs

        ct, anatomy = check_mapping_inputs(args.ct, args.anatomy, atlases=args.atlases)
        atlas_set = resolve_atlas_set(args.atlases, allow_missing_stations=True)
    else:
        ct = _read_ct(args.ct)
    run_ = map_case(ct, method, anatomy=anatomy, atlas_set=atlas_set, station_model=model, device=args.device.torch,
                    config=cfg, what=f"--ct {args.ct}")
    mapping = run_.mapping
    paths = mapping.write(args.out, None if args.no_overlay else ct)
    if method == "both":
        net_paths = run_.network.write(Path(args.out) / "network", None if args.no_overlay else ct)
        paths.update({f"network_{k}": v for k, v in net_paths.items()})
    out = {"out": str(Path(args.out)), "files": {k: str(v) for k, v in paths.items()}, **mapping.to_dict(),
           **run_.to_dict()}
    what = (f"{len(mapping.atlas_ids)} atlases" if mapping.method == "atlas" else "station network")
    lines = [f"station map written to {args.out} ({what})"]
    for name, st in out["stations"].items():
        if st["flag"] != "absent":
            lines.append(f"  {name:>4}: {st['flag']:<20} agreement {st['agreement']}  centre {st['centre_mm']}")
    if run_.agreement_dice is not None:
        lines.append(f"atlas vs network, Dice per station (mean {out['agreement_dice_mean']}):")
        lines += [f"  {k:>4}: {'-' if v is None else f'{v:.3f}'}" for k, v in out["agreement_dice"].items()]
    options.emit(out, args.json, "\n".join(lines))
    return 0


def _read_ct(path: str):
    """The CT of --ct alone (file checked complete, values checked), for the network method."""
    from ...errors import InputError
    from ...io.images import read_image_file
    from ...preflight.case import check_image_file
    from ...preflight.image_values import check_ct_values

    what = f"--ct {path}"
    if Path(path).is_dir():
        raise InputError(f"{what}: expected an image file, got a folder")
    check_image_file(path, "CT", what)
    ct = read_image_file(path)
    check_ct_values(ct, what)
    return ct
