"""Hub push through the real HfApi code path against a loopback HTTP server (no mocks of our code)."""

import os

import pytest

from spam_hf.export.hub import PushError, push_folder

from fake_hub import FakeHub


@pytest.fixture(autouse=True)
def online_to_loopback(monkeypatch):
    """The suite runs with HF_HUB_OFFLINE=1; these tests talk to a server on 127.0.0.1 only."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def make_folder(tmp_path):
    d = tmp_path / "export"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "bert"}')
    (d / "model.safetensors").write_bytes(b"\x00" * 1000)
    (d / "README.md").write_text("# card")
    return str(d)


def test_push_uploads_folder_in_one_commit(tmp_path):
    folder = make_folder(tmp_path)
    with FakeHub() as hub:
        url = push_folder(folder, "user/tiny-spam", token="hf_test", endpoint=hub.url)
        assert "commit" in url
        assert len(hub.commits) == 1
        repo, files = hub.commits[0]
        assert repo == "user/tiny-spam"
        assert files == ["README.md", "config.json", "model.safetensors"]
        assert hub.repos["user/tiny-spam"]["config.json"] == b'{"model_type": "bert"}'


def test_failed_push_removes_created_repo_and_keeps_local_export(tmp_path):
    folder = make_folder(tmp_path)
    with FakeHub(fail_commit=True) as hub:
        with pytest.raises(PushError, match="(?s)upload to user/tiny-spam failed.*intact"):
            push_folder(folder, "user/tiny-spam", token="hf_test", endpoint=hub.url)
        assert "user/tiny-spam" not in hub.repos
        assert any(m == "DELETE" for m, _ in hub.requests)
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]


def test_interrupted_push_removes_created_repo(tmp_path, monkeypatch):
    """Ctrl-C during the upload: the repository the push created is deleted and the interrupt goes on."""
    from huggingface_hub import HfApi

    folder = make_folder(tmp_path)

    def interrupted(self, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(HfApi, "upload_folder", interrupted)
    with FakeHub() as hub:
        with pytest.raises(KeyboardInterrupt):
            push_folder(folder, "user/tiny-spam", token="hf_test", endpoint=hub.url)
        assert "user/tiny-spam" not in hub.repos
        assert any(m == "DELETE" for m, _ in hub.requests)
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]


def test_unreachable_hub_is_a_clear_error(tmp_path):
    folder = make_folder(tmp_path)
    with pytest.raises(PushError, match="cannot reach the Hub"):
        push_folder(folder, "user/x", token="hf_test", endpoint="http://127.0.0.1:9")


def test_the_pre_check_verifies_write_access_before_any_work(tmp_path, monkeypatch):
    """check_hub (run by compress before training) asks whoami: no token, a refused token, a read-only token or
    a namespace the user cannot write to is a PushError now (it used to pass an anonymous lookup and fail with a
    401 after the whole job); the user's own namespace and an organisation with a write role pass."""
    from spam_hf.export.hub import check_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved token either
    with FakeHub() as hub:
        check_hub("user/new-model", token="hf_test", endpoint=hub.url)
        check_hub("team/new-model", token="hf_test", endpoint=hub.url)
        for repo, token, message in (("user/x", "hf_read", "it is read-only"),
                                     ("readers/x", "hf_test", "cannot write to 'readers'"),
                                     ("someone-else/x", "hf_test", "it can write to team, user"),
                                     ("user/x", "hf_bogus", r"refused the token \(401\)")):
            with pytest.raises(PushError, match=message):
                check_hub(repo, token=token, endpoint=hub.url)
        import huggingface_hub.constants as c

        monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        with pytest.raises(PushError, match="no Hub token"):
            check_hub("user/x", endpoint=hub.url)
