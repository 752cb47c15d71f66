"""``lmms-emi ablate RUN``: the estimator × embedding-space ablation of a judged run (paper Tables 4 and 5).

The run's own space is read from its saved embeddings (no encoder is loaded for it); each space named with
``--spaces`` (an encoder profile) is read from ``<id>_emi_space_<space>.safetensors`` beside the run when an
earlier ablate wrote it, else embedded once from the run's records, gathered as ``score`` (response files
and the dataset the run recorded) or ``analyze`` (the lmms-eval samples logs) gather them, through the
embedding cache, and saved there. Then :func:`lmms_emi.pipeline.ablation.ablate` fits every MI estimator on
every space and the reports are written (:mod:`lmms_emi.report_ablation`).

Every check that can fail in one line (the run has no judge verdicts; no embeddings and nothing to embed
from; an unknown estimator or space; encoder overrides with several spaces) runs before any record is read
or any estimator is fitted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmms_emi.cli._commands import subcommand_parser
from lmms_emi.cli._options import add_emi_options, add_output_options, config_from
from lmms_emi.config import JSD_ESTIMATOR_NAMES, MI_ESTIMATOR_NAMES
from lmms_emi.errors import EXIT_OK, UsageError
from lmms_emi.metrics import RECORD_METRIC

if TYPE_CHECKING:  # imported where used: `ablate --help` starts without torch
    from lmms_emi.config import EMIConfig
    from lmms_emi.emi import TaskEmbeddings
    from lmms_emi.pipeline.records import Sample
    from lmms_emi.report_ablation import JudgedRun

NAME = "ablate"
#: What ``ablate`` takes from the options a run recorded (its fit), so the run's own cell is reproduced.
_FIT_OPTIONS = ("estimator_steps", "estimator_patience", "estimator_fit", "seed")
#: Encoder options naming the encoders of the one space of ``--spaces`` -> the Embedder's argument.
_OVERRIDES = {"vision_encoder": "vision", "text_encoder": "text", "text_layer": "text_layer"}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subcommand_parser(
        sub,
        NAME,
        ". Table 4 (Spearman ρ between EMI and the judge's win rate per MI estimator × embedding space) and "
        "Table 5 (Pearson r between EMID and its bound per JSD × MI estimator × space) of a run scored with "
        "--judge (score, analyze or eval), from its saved embeddings; other spaces are embedded once from "
        "the run's records and kept beside them. See docs/ABLATION.md.",
    )
    p.add_argument(
        "run_path", metavar="RUN", help="the judged run's report folder (or its lmms-eval output folder)"
    )
    p.add_argument("--run-id", help="which run of the folder (default: the latest judged one)")
    p.add_argument(
        "--spaces",
        default="",
        help="encoder profiles to add to the run's own space, comma-separated (e.g. paper,offline,e5v-joint)",
    )
    every = {"--mi-estimators": MI_ESTIMATOR_NAMES, "--jsd-estimators": JSD_ESTIMATOR_NAMES}
    for flag, names in every.items():
        p.add_argument(
            flag, default=",".join(names), help=f"comma-separated (default: all, {','.join(names)})"
        )
    p.add_argument("--dataset", help="local copy of the data the run used (to embed another space)")
    p.add_argument("--metric", default=RECORD_METRIC, help="metric key of an lmms-eval run's records")
    add_output_options(p, required=False, help="report folder (default: the run's report folder)")
    add_emi_options(p, ("encoders", "estimator", "display"), skip=("encoders", "estimator", "mi_estimator"))
    return p


def _names(text: str) -> list[str]:
    return list(dict.fromkeys(n.strip() for n in str(text).split(",") if n.strip()))


def _config(ns: argparse.Namespace, run_folder: Path) -> EMIConfig:
    """Flags over ``LMMS_EMI_*`` over the fit the run recorded (an lmms-eval run folder's results JSON)."""
    from lmms_emi.config import OPTIONS_VAR, EMIConfig
    from lmms_emi.sources.run_folder import recorded_options

    try:
        recorded = recorded_options(run_folder) or {}
    except UsageError:  # a moved checkpoint: the fit options alone are wanted here
        recorded = {}
    fit = {k: recorded[k] for k in _FIT_OPTIONS if k in recorded}
    base = EMIConfig.from_sources(environ={OPTIONS_VAR: json.dumps(fit)}) if fit else None
    return config_from(ns, base=base)


def run(ns: argparse.Namespace) -> int:
    from lmms_emi.embed.profiles import PROFILES
    from lmms_emi.pipeline.ablation import FitSettings, check_names
    from lmms_emi.pipeline.preflight import check_outputs
    from lmms_emi.report_ablation import find_judged_run

    mi_names, jsd_names = _names(ns.mi_estimators), _names(ns.jsd_estimators)
    check_names(mi_names, jsd_names)
    spaces = _names(ns.spaces)
    unknown = [s for s in spaces if s not in PROFILES]
    if unknown:
        raise UsageError(f"--spaces: unknown space {unknown[0]!r}; one of {', '.join(PROFILES)}")
    judged = find_judged_run(ns.run_path, ns.run_id)
    config = _config(ns, Path(ns.run_path))
    overrides = {arg: getattr(config, k) for k, arg in _OVERRIDES.items() if getattr(config, k) is not None}
    if overrides and len(spaces) != 1:
        raise UsageError(
            "--vision-encoder / --text-encoder / --text-layer name the encoders of one space: give exactly "
            "one --spaces profile with them"
        )
    if judged.embeddings_file is None and not spaces:
        raise UsageError(
            f"{judged.folder}: run {judged.run_id} has no saved embeddings ({judged.run_id}_emi_embeddings."
            "safetensors) and no --spaces was named to embed its records in"
        )
    out = Path(ns.output_path) if ns.output_path else judged.folder
    check_outputs({"--output-path": out})
    fit = FitSettings(
        config.estimator_steps, config.seed, config.estimator_patience or None, config.estimator_fit
    )
    chosen, info = _spaces(ns, config, judged, spaces, overrides)
    return _report(ns, judged, chosen, info, mi_names, jsd_names, fit, out, config.progress)


def _spaces(
    ns: argparse.Namespace,
    config: EMIConfig,
    judged: JudgedRun,
    names: Sequence[str],
    overrides: Mapping[str, Any],
) -> tuple[dict[str, dict[str, TaskEmbeddings]], dict[str, dict[str, Any]]]:
    """Every space's embeddings (the run's own first) and what the report says of each: read from the saved
    files, or embedded from the run's records (every check first, then the records read once)."""
    from lmms_emi.embed.profiles import PROFILES, profile_spec
    from lmms_emi.embed.store import load_embeddings
    from lmms_emi.encoder_spec import spec_differences
    from lmms_emi.report_ablation import space_file

    spaces: dict[str, dict[str, TaskEmbeddings]] = {}
    info: dict[str, dict[str, Any]] = {}
    tasks: list[str] | None = None
    if judged.embeddings_file is not None:
        own, spec = load_embeddings(judged.embeddings_file)
        same = [p for p in names if not spec_differences(profile_spec(p, **overrides), spec)]
        known = same or [p for p in PROFILES if not spec_differences(profile_spec(p), spec)]
        label = f"{known[0]} (run)" if known else "run"
        spaces[label] = own
        info[label] = {"encoders": spec, "source": f"saved by the run ({judged.embeddings_file.name})"}
        names = [p for p in names if p not in same]
        tasks = list(own)
    todo: list[tuple[str, dict[str, Any], Path]] = []
    for name in names:
        want = profile_spec(name, **overrides)
        path = space_file(judged, name)
        if not path.is_file():
            todo.append((name, want, path))
            continue
        saved, spec = load_embeddings(path)
        problems = spec_differences(want, spec, expected_label="the saved file has")
        if problems:
            raise UsageError(
                f"{path}: embedded with other encoders than space {name!r}: {'; '.join(problems)}"
            )
        spaces[name] = _in_order(saved, tasks, path)
        info[name] = {"encoders": spec, "source": f"read back ({path.name})"}
    if todo:
        samples = _records(ns, judged, config.progress)
        order = tasks or list(samples)
        for name, _want, path in todo:
            embs, spec, stats = _embed(
                name, config, overrides, {t: samples[t] for t in order if t in samples}
            )
            _save(embs, path, spec, judged, name)
            spaces[name] = _in_order(embs, tasks, path)
            info[name] = {"encoders": spec, "source": f"embedded now ({path.name})", "embed_stats": stats}
    return spaces, info


def _in_order(
    embs: Mapping[str, TaskEmbeddings], tasks: Sequence[str] | None, where: Path
) -> dict[str, TaskEmbeddings]:
    """``embs`` in the run's task order (its own space's), every task present."""
    if tasks is None:
        return dict(embs)
    missing = [t for t in tasks if t not in embs]
    if missing:
        raise UsageError(f"{where}: no embeddings of task {missing[0]!r} of the run")
    return {t: embs[t] for t in tasks}


def _records(ns: argparse.Namespace, judged: JudgedRun, progress: bool) -> dict[str, list[Sample]]:
    """The run's records as ``score`` (response files against the dataset it recorded) or ``analyze`` (the
    lmms-eval run folder's samples logs) gathers them; one line when the run recorded neither."""
    from lmms_emi import scenarios as sc

    meta = judged.metadata
    if meta.get("responses") and meta.get("benchmark"):
        from lmms_emi.sources.datasets import ColumnNames, load_splits
        from lmms_emi.sources.response_files import collect_samples

        responses = Path(meta["responses"])
        if not responses.is_dir():
            raise UsageError(
                f"the run's response files {responses} are gone; nothing to embed another space from"
            )
        tasks = {t for _id, group in judged.groups.values() for t in group} | set(judged.win_rates)
        scenarios = [s for s in sc.select_scenarios(meta["benchmark"], None) if s.task in tasks]
        splits = load_splits(
            ns.dataset or meta.get("dataset"), meta["benchmark"], [s.split for s in scenarios]
        )
        columns = ColumnNames(**(meta.get("columns") or {}))  # the columns the run's --*-column flags named
        return collect_samples(splits, scenarios, responses, str(meta["model"]), columns, progress=progress)
    folder = meta.get("run_dir") or (Path(meta["results_file"]).parent if meta.get("results_file") else None)
    if folder is None and any(judged.folder.glob(f"{judged.run_id}_samples_*.jsonl")):
        folder = judged.folder  # an `eval` run: its reports sit beside its samples logs
    if folder is None or not Path(folder).is_dir():
        raise UsageError(
            f"{judged.folder}: run {judged.run_id} recorded no response files or lmms-eval run folder to "
            "embed another space from"
        )
    from lmms_emi.sources.run_folder import read_run

    return read_run(folder, metric=ns.metric).samples(dataset=ns.dataset, progress=progress)


def _embed(
    name: str, config: EMIConfig, overrides: Mapping[str, Any], samples: Mapping[str, Sequence[Sample]]
) -> tuple[dict[str, TaskEmbeddings], dict[str, Any], dict[str, Any]]:
    """One space's embeddings of ``samples`` (through the embedding cache), its encoder spec and the
    embedder's counts (encoder calls, cache hits)."""
    from lmms_emi.embed import Embedder
    from lmms_emi.environment import quiet_hub
    from lmms_emi.pipeline.records import embed_tasks

    kwargs = {k: v for k, v in config.embedder_kwargs().items() if k not in _OVERRIDES.values()}
    with quiet_hub():
        embedder = Embedder.from_profile(name, **kwargs, **overrides)
    embs = embed_tasks(embedder, samples)
    stats = {"encoder_calls": embedder.stats.encoder_calls, "cache_hits": embedder.stats.cache_hits}
    return embs, dict(embedder.encoder_spec()), stats


def _save(
    embs: Mapping[str, TaskEmbeddings], path: Path, spec: Mapping[str, Any], judged: JudgedRun, name: str
) -> None:
    from lmms_emi.embed.store import save_embeddings

    extra = {**judged.metadata, "space": name, "run_id": judged.run_id}
    save_embeddings(embs, path, encoders=spec, extra=extra)


def _report(
    ns: argparse.Namespace,
    judged: JudgedRun,
    spaces: dict[str, dict[str, TaskEmbeddings]],
    info: dict[str, dict[str, Any]],
    mi_names: list[str],
    jsd_names: list[str],
    fit: Any,
    out: Path,
    progress: bool,
) -> int:
    from lmms_emi.pipeline.ablation import ablate, run_groups
    from lmms_emi.report_ablation import write_ablation_report
    from lmms_emi.tables import fmt_number, fmt_p

    first = next(iter(spaces.values()))
    groups = judged.groups or run_groups(list(first))
    result = ablate(
        spaces,
        judged.win_rates,
        mi_estimators=mi_names,
        jsd_estimators=jsd_names,
        groups=groups,
        fit=fit,
        space_info=info,
        progress=progress,
    )
    paths = write_ablation_report(
        result, out, run_id=judged.run_id, model=judged.model, run=f"{judged.folder} ({judged.run_id})"
    )
    for c in result.agreement:
        print(
            f"{c.space} × {c.mi_estimator}: ρ(EMI, WR) {fmt_number(c.spearman_rho)} "
            f"(p {fmt_p(c.spearman_p)}) over {c.n_tasks} tasks, {c.seconds:.2f} s"
        )
    print(f"reports: {', '.join(str(p) for p in paths.values())}")
    for w in result.warnings:
        print(f"lmms-emi: warning: {w}", file=sys.stderr)
    return EXIT_OK
