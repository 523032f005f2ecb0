"""The Hugging Face Hub side of Hub folders (:mod:`zoo.hub`): ``hf-hub:`` downloads and ``zoo push``.

huggingface_hub is optional (``pip install "attention-zoo[hub]"``); without it, a token or the network
these fail at once with a :class:`zoo.hub.HubError` saying which. ``HF_HUB_OFFLINE=1`` is respected:
only the local cache is read.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import WeightsError
from .hub import CONFIG, WEIGHTS, HubError, save_checkpoint


def _hf():
    try:
        import huggingface_hub
    except ImportError:
        raise HubError("the Hugging Face Hub needs huggingface_hub: pip install 'attention-zoo[hub]' "
                       "(or pip install huggingface_hub)") from None
    return huggingface_hub


def _offline() -> bool:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on") or constants.HF_HUB_OFFLINE


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def reachable(timeout: float = 3.0) -> str | None:
    """``None`` when the Hub's host answers within ``timeout`` seconds, else why not."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{url.hostname} cannot be reached ({type(e).__name__}: {e})"


def download(repo: str) -> Path:
    """``ORG/NAME[@REVISION]`` -> the local folder of its ``config.json`` and ``model.safetensors``
    (the Hub's cache). Offline (``HF_HUB_OFFLINE=1``, or no network) only a cached copy is used."""
    hf = _hf()
    from huggingface_hub import errors

    repo_id, _, revision = repo.partition("@")
    why = "HF_HUB_OFFLINE is set" if _offline() else reachable()
    paths = []
    for filename in (CONFIG, WEIGHTS):
        try:
            paths.append(hf.hf_hub_download(repo_id, filename, revision=revision or None, etag_timeout=5,
                                            local_files_only=why is not None, library_name="attention-zoo"))
        except errors.RemoteEntryNotFoundError:
            if filename == WEIGHTS:
                raise WeightsError(f"hf-hub:{repo} has no {WEIGHTS}: the zoo loads Hub weights from safetensors only") from None
            raise HubError(f"hf-hub:{repo} has no {CONFIG}: it is not a timm / zoo model repository") from None
        except errors.RepositoryNotFoundError:
            raise HubError(f"hf-hub:{repo_id} does not exist on the Hub (or is private: log in with `hf auth login`)") from None
        except errors.RevisionNotFoundError:
            raise HubError(f"hf-hub:{repo_id} has no revision {revision!r}") from None
        except OSError as e:  # LocalEntryNotFoundError, OfflineModeIsEnabled, connection errors
            reason = why or f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            raise HubError(f"cannot download hf-hub:{repo}: the Hub cannot be reached ({reason}) and it is not in "
                           "the local cache. Connect to the network, or download the folder elsewhere and load it "
                           "with local-dir:DIR") from None
    return Path(paths[-1]).parent


def push(src: str | Path, repo: str, *, private: bool = False, dry_run: str | Path | None = None,
         overwrite: bool = False) -> dict[str, Any]:
    """``python -m zoo push``: build the Hub folder of checkpoint ``src`` and upload it to ``repo``
    (``create_repo`` + ``upload_folder``). ``dry_run=DIR`` writes the folder to DIR and uploads nothing.
    Without huggingface_hub, a token or the network this fails before the net is built."""
    import tempfile

    if "/" not in repo or repo.count("/") != 1:
        raise HubError(f"--repo must be ORG/NAME (or USER/NAME); got {repo!r}")
    hf = _hf()
    from huggingface_hub import errors

    if dry_run is None:
        if not (hf.get_token() or os.environ.get("HF_TOKEN")):
            raise HubError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN "
                           "(a token with write access), then push again")
        why = "HF_HUB_OFFLINE is set" if _offline() else reachable()
        if why:
            raise HubError(f"cannot push to {repo}: the Hub cannot be reached ({why}); "
                           "`--dry-run DIR` writes the folder that would be uploaded")
    if dry_run is not None:
        folder = save_checkpoint(src, dry_run, overwrite=overwrite)
        return {"repo": repo, "folder": str(folder), "files": sorted(p.name for p in folder.iterdir()), "url": None}
    with tempfile.TemporaryDirectory(prefix="zoo-push-") as tmp:
        folder = save_checkpoint(src, Path(tmp) / "model")
        files = sorted(p.name for p in folder.iterdir())
        try:
            url = hf.create_repo(repo, private=private, exist_ok=True)
            hf.upload_folder(repo_id=repo, folder_path=str(folder), commit_message=f"Upload {Path(str(src)).name} with attention-zoo")
        except errors.HfHubHTTPError as e:
            raise HubError(f"the Hub refused the upload to {repo}: {str(e).splitlines()[0][:300]}") from None
        except OSError as e:
            raise HubError(f"cannot push to {repo}: the Hub cannot be reached ({type(e).__name__}: {e})") from None
    return {"repo": repo, "folder": None, "files": files, "url": str(url)}
