"""Where the plugin's data folders live: in the wheel (``lmms_emi/<name>``) or a checkout (``./<name>``)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def _locate(name: str) -> Path:
    """``lmms_emi/<name>`` when installed from the wheel, else ``<checkout>/<name>``."""
    for candidate in (_PACKAGE_DIR / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"the plugin's {name}/ folder is missing (looked in {_PACKAGE_DIR / name} and "
        f"{_PACKAGE_DIR.parent / name}); reinstall lmms-emi"
    )


def tasks_dir() -> Path:
    """The folder of the plugin's lmms-eval task YAMLs (what ``--include_path`` must point at)."""
    return _locate("tasks")


def estimator_ckpt_dirs() -> list[Path]:
    """Folders of the estimator checkpoints shipped with the plugin (wheel and checkout), those that exist."""
    return [
        d for d in (_PACKAGE_DIR / "estimator_ckpt", _PACKAGE_DIR.parent / "estimator_ckpt") if d.is_dir()
    ]


def user_cache_dir(kind: str) -> Path:
    """The default folder of one of the plugin's caches (``"embeddings"``, ``"estimators"``, ``"judge"``):
    ``<user cache dir>/lmms_emi/<kind>``, where the user cache dir is platformdirs' (``$XDG_CACHE_HOME`` or
    ``~/.cache`` on Linux). Each cache's own ``LMMS_EMI_*`` variable overrides it (see
    :data:`lmms_emi.config.ENVIRONMENT`)."""
    import platformdirs

    return platformdirs.user_cache_path("lmms_emi") / kind
