"""Push an exported folder to the Hub in one commit through ``huggingface_hub``."""

from __future__ import annotations

from typing import Optional

from huggingface_hub import HfApi
from transformers.utils import logging

logger = logging.get_logger(__name__)


class PushError(RuntimeError):
    """The push failed; the local export is intact."""


def check_hub(repo_id: str, token: Optional[str] = None, endpoint: Optional[str] = None) -> None:
    """Before a long job that ends with a push: the Hub must answer (``repo_exists``), else :class:`PushError`
    now, in one line (offline mode, no network), instead of after training."""
    try:
        HfApi(endpoint=endpoint, token=token).repo_exists(repo_id)
    except Exception as e:
        raise PushError(f"--push-to-hub {repo_id}: the Hub cannot be reached now ({type(e).__name__}: {e}); "
                        "nothing was trained or written. Drop --push-to-hub, or push later with "
                        "`huggingface-cli upload`") from None


def push_folder(folder: str, repo_id: str, token: Optional[str] = None, private: bool = False,
                endpoint: Optional[str] = None, commit_message: str = "Upload model pruned with spam-hf") -> str:
    """``create_repo(exist_ok=True)`` then ``upload_folder`` (one commit). Returns the commit URL.

    A repository this call created is deleted again if the upload fails or is interrupted, so a failed
    push leaves no partial state behind (the upload is one commit: all files land or none). Token:
    ``token`` or the usual places (``HF_TOKEN``, ``hf auth login``).
    """
    api = HfApi(endpoint=endpoint, token=token)
    try:
        existed = api.repo_exists(repo_id)
    except Exception as e:
        raise PushError(f"cannot reach the Hub to push {repo_id}: {type(e).__name__}: {e}") from None
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
    except Exception as e:
        raise PushError(f"could not create {repo_id}: {type(e).__name__}: {e}") from None
    try:
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=commit_message)
    except BaseException as e:  # an interrupted push (Ctrl-C) too: no empty repository left behind
        if not existed:
            try:
                api.delete_repo(repo_id)
            except Exception as cleanup:  # pragma: no cover - best effort
                logger.warning(f"could not delete the half-created repo {repo_id}: {cleanup}")
        if not isinstance(e, Exception):
            raise
        raise PushError(f"upload to {repo_id} failed: {type(e).__name__}: {e}; the local export in {folder} "
                        "is intact") from None
    return str(getattr(info, "commit_url", info))
