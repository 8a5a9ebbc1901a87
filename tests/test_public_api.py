"""The public API (`robust_sparse.api`): pruning a Keras model, the lottery-ticket callback,
the registries' lists, measurements in a `RobustModel`'s fit, and the README's example."""

import os
import re

import keras
import numpy as np
import pytest

from robust_sparse import api
from robust_sparse.nn import pruning
from robust_sparse.measure import saturation
from tests.conftest import REPO


def _plain_model():
  inputs = keras.Input((8, 8, 1))
  x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
  x = keras.layers.Flatten(name="flatten")(x)
  x = keras.layers.Dense(16, activation="relu", name="hidden")(x)
  return keras.Model(inputs, keras.layers.Dense(5, name="output")(x), name="plain")


def _mlp(seed=0):
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((6,))
  x = api.MaskedDense(12, activation="relu", name="hidden_1")(inputs)
  x = api.MaskedDense(10, activation="relu", name="hidden_2")(x)
  model = keras.Model(inputs, api.MaskedDense(3, name="output")(x), name="mlp")
  model.compile(optimizer=keras.optimizers.Adam(0.02),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  return model


def _data(n=64, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 3, n)


def test_masked_converts_plain_layers_and_computes_the_same():
  keras.utils.set_random_seed(0)
  plain = _plain_model()
  converted = api.masked(plain)
  kinds = {layer.name: type(layer) for layer in converted.layers}
  assert kinds["conv"] is api.MaskedConv2D and kinds["hidden"] is api.MaskedDense
  assert kinds["output"] is api.MaskedDense and kinds["flatten"] is keras.layers.Flatten
  x = np.random.default_rng(1).uniform(size=(4, 8, 8, 1)).astype(np.float32)
  np.testing.assert_array_equal(converted(x), plain(x))
  report = api.sparsity_report(converted)
  assert report.percent_remaining == 100.0 and report.total == 36 + 144 * 16 + 80
  # Pruned, stripped back to plain layers: the same outputs, exact zeros.
  api.prune_low_magnitude(converted, 0.5)
  stripped = api.strip_masks(converted)
  np.testing.assert_allclose(stripped(x), converted(x), atol=1e-6)
  assert int(np.sum(stripped.get_layer("hidden").kernel.numpy() == 0)) == 144 * 16 // 2

  class Subclassed(keras.Model):
    def call(self, x):
      return x

  with pytest.raises(ValueError, match="subclassed"):
    api.masked(Subclassed())


@pytest.mark.parametrize("scope,output_rate", [("layer", 0.1), ("layer", None), ("global", None)])
def test_prune_low_magnitude_has_the_toolkit_counts(scope, output_rate):
  model = _mlp()
  masks = api.get_masks(model)
  for _ in range(2):  # Twice: the second step counts only the unpruned weights.
    kernels = api.get_kernels(model)
    rates = pruning.scope_rates(list(kernels), 0.2, output_rate, scope)
    expected = pruning.prune(kernels, masks, rates, scope)
    report = api.prune_low_magnitude(model, 0.2, scope=scope, output_rate=output_rate)
    new = api.get_masks(model)
    for name in kernels:
      np.testing.assert_array_equal(new[name], expected[name])
      assert np.all(new[name][masks[name] == 0] == 0)  # Pruned weights stay pruned.
      assert np.all(api.get_kernels(model)[name][new[name] == 0] == 0)
      if scope == "layer":
        rate = output_rate if (name == "output" and output_rate is not None) else 0.2
        assert masks[name].sum() - new[name].sum() == round(rate * masks[name].sum())
    if scope == "global":
      before = sum(m.sum() for m in masks.values())
      assert before - report.remaining == round(0.2 * before)
    assert report.remaining == sum(int(m.sum()) for m in new.values())
    masks = new
  assert "total" in str(report) and report.as_dict()["total"] == report.percent_remaining


def test_prune_low_magnitude_refuses_bad_input_with_one_line():
  model = _mlp()
  with pytest.raises(ValueError, match="output_rate"):
    api.prune_low_magnitude(model, 0.2, scope="global", output_rate=0.1)
  with pytest.raises(ValueError, match="unknown prune scope"):
    api.prune_low_magnitude(model, 0.2, scope="sideways")
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    api.prune_low_magnitude(model, 1.5)
  with pytest.raises(ValueError, match="nope"):
    api.prune_low_magnitude(model, 0.2, layers=["nope"])
  with pytest.raises(ValueError, match=r"masked\(model\)"):
    api.prune_low_magnitude(_plain_model(), 0.2)
  with pytest.raises(ValueError, match="shape"):
    api.set_masks(model, {"output": np.ones((2, 2))})


class _Record(keras.callbacks.Callback):
  """Kernels, masks and other weights at each epoch end (and after `batches` batches)."""

  def __init__(self, batches=None):
    super().__init__()
    self.epochs, self.batches, self._at, self._seen = [], {}, batches, 0

  def _snapshot(self):
    return dict(kernels=api.get_kernels(self.model), masks=api.get_masks(self.model),
                weights=[w.numpy().copy() for w in self.model.weights],
                iterations=int(self.model.optimizer.iterations.numpy()))

  def on_train_batch_end(self, batch, logs=None):
    self._seen += 1
    if self._at is not None and self._seen == self._at:
      self.batches[self._seen] = self._snapshot()

  def on_epoch_end(self, epoch, logs=None):
    self.epochs.append(self._snapshot())


def _fit_ticket(ticket, epochs, batches=None):
  model = _mlp()
  start = dict(kernels=api.get_kernels(model),
               weights=[w.numpy().copy() for w in model.weights])
  before, after = _Record(batches), _Record()
  x, y = _data()
  model.fit(x, y, batch_size=16, epochs=epochs, callbacks=[before, ticket, after], verbose=0)
  return model, start, before, after


@pytest.mark.parametrize("rewind_to", ["init", 3, None])
def test_lottery_ticket_prunes_the_toolkits_counts_and_rewinds(rewind_to):
  rounds, per_round = 2, 2
  ticket = api.LotteryTicket(0.2, rounds=rounds, output_rate=0.1, rewind_to=rewind_to)
  model, start, before, after = _fit_ticket(ticket, (rounds + 1) * per_round, batches=3)
  rewind_point = start if rewind_to == "init" else before.batches.get(3)
  masks = {name: np.ones_like(k) for name, k in start["kernels"].items()}
  for level in range(rounds + 1):
    end = (level + 1) * per_round - 1  # The level's last epoch.
    trained, ticketed = before.epochs[end], after.epochs[end]
    np.testing.assert_array_equal(trained["masks"]["hidden_1"], masks["hidden_1"])
    for name, mask in masks.items():  # The masks held during training.
      assert np.all(trained["kernels"][name][mask == 0] == 0)
    assert ticket.levels[level]["percent_remaining"] == pytest.approx(
        pruning.percent_remaining(masks))
    if level == rounds:  # The last level is not pruned.
      np.testing.assert_array_equal(ticketed["masks"]["output"], masks["output"])
      break
    rates = pruning.layer_rates(list(masks), 0.2, 0.1)
    expected = pruning.prune(trained["kernels"], masks, rates)
    for name in masks:
      np.testing.assert_array_equal(ticketed["masks"][name], expected[name])
      removed = masks[name].sum() - expected[name].sum()
      assert removed == round(rates[name] * masks[name].sum())
      source = trained if rewind_to is None else rewind_point
      # Rewound (or kept) weights times the new mask, exactly.
      np.testing.assert_array_equal(ticketed["kernels"][name],
                                    source["kernels"][name] * expected[name])
    if rewind_to is not None:
      assert ticketed["iterations"] == (0 if rewind_to == "init" else 3)
      biases = [w for w, v in zip(ticketed["weights"], model.weights) if v.name == "bias"]
      np.testing.assert_array_equal(
          biases[0], [w for w, v in zip(rewind_point["weights"], model.weights)
                      if v.name == "bias"][0])
    masks = expected
  assert [level["level"] for level in ticket.levels] == list(range(rounds + 1))


def test_lottery_ticket_global_scope_and_bad_arguments():
  ticket = api.LotteryTicket(0.5, rounds=1, scope="global")
  _, start, before, after = _fit_ticket(ticket, 2)
  total = sum(k.size for k in start["kernels"].values())
  assert sum(m.sum() for m in after.epochs[0]["masks"].values()) == total - round(0.5 * total)
  with pytest.raises(ValueError, match="multiple of 3"):
    _fit_ticket(api.LotteryTicket(0.2, rounds=2), 4)
  with pytest.raises(ValueError, match="epochs=6"):
    _fit_ticket(api.LotteryTicket(0.2, rounds=2, epochs_per_round=2), 4)
  with pytest.raises(ValueError, match="first level ran only 4"):
    _fit_ticket(api.LotteryTicket(0.2, rounds=1, rewind_to=50), 2)
  for kwargs in (dict(rounds=0), dict(rounds=1, rewind_to=-1), dict(rounds=1, scope="x"),
                 dict(rounds=1, output_rate=2.0), dict(rounds=1, rewind_to="start")):
    with pytest.raises(ValueError, match="LotteryTicket"):
      api.LotteryTicket(0.2, **kwargs)


def test_lists_come_from_the_registries():
  from robust_sparse.attacks import ATTACKS
  from robust_sparse.data import DATASETS
  from robust_sparse.experiments import EXPERIMENTS
  from robust_sparse.models import MODELS
  assert api.list_models() == MODELS.names() and "dense-300-100" in api.list_models()
  assert api.list_datasets() == DATASETS.names() and "sklearn_digits" in api.list_datasets()
  assert api.list_attacks() == ATTACKS.names() and "pgd" in api.list_attacks()
  assert api.list_experiments() == EXPERIMENTS.names()
  assert "reinit_orig" in api.list_experiments()
  assert api.list_models("resnet*") and all(n.startswith("resnet")
                                            for n in api.list_models("resnet*"))
  assert api.list_attacks("*gd*") == ["apgd_ce", "apgd_t", "pgd"]


def _digits_network(digits):
  keras.utils.set_random_seed(0)
  return api.build_model("dense-300-100", digits.input_shape, digits.num_classes)


def test_measurements_in_a_robust_models_fit(digits):
  network = _digits_network(digits)
  measurement = api.Measurements(network, ["saturation", "activation_sparsity"])
  robust = api.RobustModel(network, attack=api.make_attack(api.AttackConfig("fgsm", eps=0.1)),
                           measurement=measurement)
  robust.compile(optimizer=api.make_optimizer("sgd", 0.05), jit_compile=False)
  x, y = digits.x_train[:256], digits.y_train[:256]
  history = robust.fit(x, y, batch_size=64, epochs=2, verbose=0,
                       validation_data=(digits.x_valid, digits.y_valid),
                       callbacks=[api.MeasurementCallback(measurement)])
  names = measurement.saturation.layer_names
  for split in ("train", "eval"):
    values = history.history[f"{split}-saturation_{names[0]}"]
    assert len(values) == 2 and all(0 < v <= 1 for v in values)
    assert all(0 <= v <= 1 for v in
               history.history[f"{split}-activation_sparsity_average"])
  # Training feeds the natural examples only (not the adversarial half).
  measurement.reset()
  robust.fit(x, y, batch_size=64, epochs=1, verbose=0)
  assert measurement.saturation.accumulators["train"][0].sums()[2] == 256
  # Evaluation feeds exactly what the network computes on the clean examples.
  measurement.reset()
  robust.evaluate(digits.x_valid, digits.y_valid, batch_size=100, verbose=0)
  reference = saturation.SaturationTracker.for_model(network)
  outputs = measurement.tap_model(digits.x_valid, training=False)
  reference.update(outputs[1:1 + len(names)], "eval")
  got, want = measurement.results(), reference.results()
  for name in names:
    key = f"eval-saturation_{name}"
    assert got[key] == want[key]
    got_sums = measurement.saturation.accumulators["eval"][names.index(name)].sums()
    want_sums = reference.accumulators["eval"][names.index(name)].sums()
    assert np.max(np.abs(got_sums[0] - want_sums[0])) <= 1e-6 * np.max(np.abs(want_sums[0]))


def test_saturation_wrap_and_robust_model_say_how_to_compose(digits):
  network = _digits_network(digits)
  with pytest.raises(ValueError, match="measurement="):
    api.SaturationCallback().wrap(api.RobustModel(network))
  with pytest.raises(ValueError, match="measurement="):
    api.RobustModel(api.SaturationCallback().wrap(network))


def test_lottery_ticket_in_an_adversarial_robust_model_fit(digits):
  network = _digits_network(digits)
  initial = api.get_kernels(network)
  robust = api.RobustModel(network, attack=api.make_attack(api.AttackConfig("fgsm", eps=0.1)))
  robust.compile(optimizer=api.make_optimizer("sgd", 0.05, momentum=0.9))
  ticket = api.LotteryTicket(0.2, rounds=1)
  robust.fit(digits.x_train[:256], digits.y_train[:256], batch_size=64, epochs=2, verbose=0,
             callbacks=[ticket])
  masks = api.get_masks(network)
  assert ticket.levels[1]["percent_remaining"] == pytest.approx(
      pruning.percent_remaining(masks)) and ticket.levels[1]["percent_remaining"] < 100
  # The second level trained from the initial weights times the mask; the
  # masks held through its adversarial training.
  for name, kernel in api.get_kernels(network).items():
    assert np.all(kernel[masks[name] == 0] == 0)
  assert int(robust.step_iteration.numpy()) == 4  # The schedule restarted at the rewind.
  # The network's own layer order inside the RobustModel: the output layer at 0.1.
  assert ticket.levels[1]["remaining"] == {"hidden_1": 15360, "hidden_2": 24000, "output": 900}
  assert set(initial) == set(masks)


def test_nested_models_keep_their_layer_order():
  block = keras.Sequential([keras.Input((4,)), api.MaskedDense(3, name="a"),
                            api.MaskedDense(2, name="b")], name="block")
  inputs = keras.Input((4,))
  x = block(api.MaskedDense(4, name="first")(inputs))
  model = keras.Model(inputs, api.MaskedDense(6, name="last")(x))
  assert list(api.get_masks(model)) == ["first", "a", "b", "last"]
  report = api.prune_low_magnitude(model, 0.5, output_rate=0.0)
  assert report.layers["last"] == (12, 12) and report.layers["a"] == (6, 12)


def test_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
  text = open(os.path.join(REPO, "README.md")).read()
  match = re.search(r"<!-- readme-test: api -->\s*```python\n(.*?)```", text, re.S)
  assert match, "README has no public API example"
  # In this process, as a notebook runs it (a fresh interpreter would add the imports' 10 s).
  monkeypatch.chdir(tmp_path)
  exec(compile(match.group(1), "README.md (readme-test: api)", "exec"), {"__name__": "readme"})
  lines = capsys.readouterr().out.strip().splitlines()
  remaining = [float(line.split()[-1]) for line in lines if line.startswith("level")]
  # dense-300-100 on 8x8 digits, 0.2 per step (output layer 0.1), unpruned counts only.
  counts, expected = np.array([64 * 300, 300 * 100, 100 * 10]), []
  for _ in range(3):
    expected.append(100 * counts.sum() / 50200)
    counts = counts - np.round(np.array([0.2, 0.2, 0.1]) * counts)
  assert remaining == pytest.approx(expected, abs=0.005)
  natural, robust = map(float, lines[-1].split(":")[1].split())
  assert 0.5 < natural <= 1.0 and 0.0 <= robust <= natural
