"""PruningConfig: checked on construction, its defaults resolved in one place from the score registry."""

import pytest

from spam_hf.pruning import PruningConfig, rounds_for_sparsity


def test_auto_resolves_from_the_score_registry():
    """method auto on a full model: damage-obs in rounds_for_sparsity rounds with compensation (a score that wants
    rounds); on LoRA: one-shot OPD. Explicit choices are kept."""
    def triple(c):
        return c.method, c.rounds, c.compensate

    assert [triple(PruningConfig(sparsity=s).resolved(lora=False)) for s in (0.5, 0.7, 0.9)] == [
        ("damage-obs", 2, True), ("damage-obs", 4, True), ("damage-obs", 7, True)]
    assert triple(PruningConfig(sparsity=0.9).resolved(lora=True)) == ("opd", 1, False)
    assert triple(PruningConfig(sparsity=0.9, method="opd").resolved(lora=False)) == ("opd", 1, False)
    assert triple(PruningConfig(sparsity=0.9, method="magnitude").resolved(lora=False)) == ("magnitude", 1, False)
    assert triple(PruningConfig(sparsity=0.9, rounds=3, compensate=True).resolved(lora=False)) == \
        ("damage-obs", 3, True)
    assert triple(PruningConfig(sparsity=0.5, compensate=False).resolved(lora=False)) == ("damage-obs", 2, False)
    assert triple(PruningConfig(sparsity=0.7, method="damage-exact").resolved(lora=False)) == ("damage-exact", 4, True)
    assert triple(PruningConfig(sparsity=0.7, method="damage").resolved(lora=True)) == ("damage", 1, False)
    assert rounds_for_sparsity(0.7) == 4


def test_in_rounds_follows_rounds_compensation_and_calibration_statistics():
    assert not PruningConfig(method="opd").resolved(False).in_rounds
    assert not PruningConfig(method="magnitude").resolved(False).in_rounds
    assert PruningConfig(method="magnitude", compensate=True).resolved(False).in_rounds
    assert PruningConfig(method="opd", rounds=2).resolved(False).in_rounds
    assert PruningConfig(method="damage").resolved(True).in_rounds  # one round, but calibration factors
    with pytest.raises(ValueError, match="resolved"):
        PruningConfig().score


@pytest.mark.parametrize("field,value,message", [
    ("sparsity", 1.0, "sparsity must be in"), ("sparsity", 0.0, "sparsity must be in"),
    ("budget", "bytes", "budget must be one of"), ("method", "taylor", "method must be one of auto, damage"),
    ("compensation", "magic", "compensation must be one of"), ("min_keep", 1.0, "min_keep"),
    ("rounds", -1, "rounds must be"), ("calibration_batches", 0, "calibration_batches"), ("flops_seq_len", 0, "flops_seq_len")])
def test_bad_values_are_one_line_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(**{field: value})


def test_build_replaces_fields_and_refuses_unknown_options():
    base = PruningConfig(sparsity=0.3, method="opd", budget="flops")
    c = PruningConfig.build(0.6, base, min_keep=0.1)
    assert (c.sparsity, c.method, c.budget, c.min_keep) == (0.6, "opd", "flops", 0.1)
    assert PruningConfig.build(0.4) == PruningConfig(sparsity=0.4)
    assert PruningConfig.build(None, base) == base
    with pytest.raises(TypeError, match="unknown pruning option"):
        PruningConfig.build(0.5, sparsty=0.3)
