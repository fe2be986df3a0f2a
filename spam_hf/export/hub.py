"""Push an exported folder to the Hub in one commit through ``huggingface_hub``."""

from __future__ import annotations

from typing import Optional

from huggingface_hub import HfApi
from transformers.utils import logging

logger = logging.get_logger(__name__)


class PushError(RuntimeError):
    """The push failed; the local export is intact."""


def check_hub(repo_id: str, token: Optional[str] = None, endpoint: Optional[str] = None) -> None:
    """Before a long job that ends with a push: the Hub must answer and the token must be able to write to
    ``repo_id``'s namespace (``whoami``: a token at all, not read-only, the user or one of their organisations with
    a write role), else :class:`PushError` now, in one line, instead of a 401 after training."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    from huggingface_hub import constants

    api = HfApi(endpoint=endpoint, token=token)
    hint = "nothing was trained or written"
    if constants.HF_HUB_OFFLINE:
        raise PushError(f"--push-to-hub {repo_id}: the Hub cannot be reached now (offline mode: HF_HUB_OFFLINE is "
                        f"set); {hint}. Drop --push-to-hub, or push later with `hf upload`")
    try:
        me = api.whoami()
    except LocalTokenNotFoundError:
        raise PushError(f"--push-to-hub {repo_id}: no Hub token (log in with `hf auth login` or set HF_TOKEN); "
                        f"{hint}") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise PushError(f"--push-to-hub {repo_id}: the Hub refused the token ({status}); {hint}") from None
        raise PushError(f"--push-to-hub {repo_id}: the Hub cannot be reached now ({type(e).__name__}: {e}); {hint}. "
                        "Drop --push-to-hub, or push later with `hf upload`") from None
    except Exception as e:
        raise PushError(f"--push-to-hub {repo_id}: the Hub cannot be reached now ({type(e).__name__}: {e}); {hint}. "
                        "Drop --push-to-hub, or push later with `hf upload`") from None
    namespace = repo_id.split("/")[0] if "/" in repo_id else me.get("name")
    allowed = writable_namespaces(me)
    if allowed is not None and namespace not in allowed:
        who = me.get("name", "this token")
        can = f"it can write to {', '.join(sorted(allowed))}" if allowed else "it is read-only"
        raise PushError(f"--push-to-hub {repo_id}: the token of {who} cannot write to {namespace!r} ({can}); "
                        f"{hint}")


WRITE_ROLES = ("admin", "write", "contributor")


def writable_namespaces(me: dict) -> Optional[set]:
    """The namespaces a ``whoami`` answer may create and write repositories in: the user's and those of
    organisations where their role writes, none for a read-only token; for a fine-grained token the entities
    scoped with ``repo.write``. ``None`` when the answer does not say (then the push itself decides)."""
    token = (me.get("auth") or {}).get("accessToken") or {}
    role = token.get("role")
    if role == "read":
        return set()
    if role == "fineGrained":
        scoped = (token.get("fineGrained") or {}).get("scoped") or []
        return {e["entity"]["name"] for e in scoped
                if "repo.write" in e.get("permissions", []) and "name" in e.get("entity", {})}
    if "name" not in me:
        return None
    orgs = {o["name"] for o in me.get("orgs", []) if o.get("roleInOrg", "write") in WRITE_ROLES and "name" in o}
    return {me["name"]} | orgs


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
