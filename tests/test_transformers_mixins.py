"""transformers' own model contracts, checked with its own tester mixins, as in-tree models do in their tests.

`ModelTesterMixin` (tests/test_modeling_common.py) and `ConfigTester` (tests/test_configuration_common.py) ship in
transformers' source distribution; `scripts/fetch_transformers_tests.sh` (run by `make setup-dev` / `make test`)
extracts them for the pinned version into `.cache/transformers-tests/<version>/tests/`. Without them (no network at
setup) this module is skipped.

`GenerationTesterMixin` (tests/generation/test_utils.py) is only in transformers' public repository. For a
development run, point `TRANSFORMERS_TESTS_DIR` at the `tests/` folder of a checkout of the matching tag:

    TRANSFORMERS_TESTS_DIR=~/src/transformers/tests pytest tests/test_transformers_mixins.py

Then the real generation (and export) mixins are used; otherwise they are empty placeholders and the one test that
asks for the generation mixin is skipped.
"""

import os
import sys
import types
import unittest
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

ROOT = Path(__file__).resolve().parents[1]

from modeling_transfusion import TransfusionConfig, TransfusionForCausalLM, TransfusionModel  # noqa: E402

PACKAGE = "transformers_tests"  # the name transformers' tests/ folder is imported under (ours is also "tests")


def _tests_dir() -> Path:
    configured = os.environ.get("TRANSFORMERS_TESTS_DIR")
    if configured:
        return Path(configured).expanduser().resolve()
    return ROOT / ".cache" / "transformers-tests" / transformers.__version__ / "tests"


# Our own list of the generic `PreTrainedConfig` arguments ConfigTester checks are kept by a config; used only when
# the checkout's tests/utils/test_configuration_utils.py (not in the sdist) is absent.
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["TransfusionForCausalLM"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
    "tie_word_embeddings": True,
    "bos_token_id": 6,
    "eos_token_id": 7,
    "pad_token_id": 8,
}


class _PlaceholderMixin:
    """Stands in for a tester mixin that the sdist does not ship: contributes no tests."""


def _stub(name: str, **attributes) -> None:
    """Register `transformers_tests.<name>` (and its parent package) unless the checkout has the file."""
    parts = name.split(".")
    if (_tests_dir().joinpath(*parts[:-1]) / f"{parts[-1]}.py").exists():
        return
    parent = f"{PACKAGE}.{parts[0]}"
    if parent not in sys.modules:
        package = types.ModuleType(parent)
        package.__path__ = []
        sys.modules[parent] = package
    module = types.ModuleType(f"{PACKAGE}.{name}")
    module.__dict__.update(attributes)
    sys.modules[module.__name__] = module


def _import_transformers_tests():
    tests_dir = _tests_dir()
    if not (tests_dir / "test_modeling_common.py").exists():
        pytest.skip(
            f"transformers' tester mixins are not at {tests_dir}: run scripts/fetch_transformers_tests.sh "
            "(needs PyPI) or set TRANSFORMERS_TESTS_DIR to a checkout's tests/ folder",
            allow_module_level=True,
        )
    pytest.importorskip(
        "parameterized", reason="transformers' tester mixins import parameterized (requirements-dev.txt)"
    )
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(tests_dir)]
        sys.modules[PACKAGE] = package
    _stub("generation.test_utils", GenerationTesterMixin=type("GenerationTesterMixin", (_PlaceholderMixin,), {}))
    _stub("exporters.test_export", ExportTesterMixin=type("ExportTesterMixin", (_PlaceholderMixin,), {}))
    _stub("utils.test_configuration_utils", config_common_kwargs=CONFIG_COMMON_KWARGS)
    import importlib

    common = importlib.import_module(f"{PACKAGE}.test_modeling_common")
    config_common = importlib.import_module(f"{PACKAGE}.test_configuration_common")
    generation = importlib.import_module(f"{PACKAGE}.generation.test_utils")
    return common, config_common, generation


_common, _config_common, _generation = _import_transformers_tests()
ModelTesterMixin = _common.ModelTesterMixin
ConfigTester = _config_common.ConfigTester
GenerationTesterMixin = _generation.GenerationTesterMixin
HAS_GENERATION_MIXIN = not issubclass(GenerationTesterMixin, _PlaceholderMixin)


# A VAE small enough for the mixins' dozens of model builds: 8×8 RGB → 4×4×4 latents.
MIXIN_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [8, 8],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 8,
    "scaling_factor": 1.0,
}
FIRST_TEXT_ID = 6  # ids below are the special tokens (bos, eos, pad, boi, eoi, image)


class TransfusionModelTester:
    """Builds the tiny config and inputs the mixins call for. `with_images`: each row is
    `<|bos|><|boi|> 4×<|image|> <|eoi|>` followed by text, with one clean 4×4 latent per row."""

    def __init__(self, parent, batch_size=2, seq_length=7, with_images=False, is_training=True):
        self.parent = parent
        self.batch_size = batch_size
        self.text_length = seq_length
        self.with_images = with_images
        self.is_training = is_training
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.num_key_value_heads = 2
        self.intermediate_size = 37
        self.latent_size = 4
        self.patch_size = 2
        self.pad_token_id = 2
        image_slots = (self.latent_size // self.patch_size) ** 2
        self.seq_length = seq_length + (image_slots + 3 if with_images else 0)

    def get_config(self) -> TransfusionConfig:
        return TransfusionConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=64,
            latent_channels=4,
            latent_size=self.latent_size,
            patch_size=self.patch_size,
            patch_encoder="linear",
            timestep_embed_dim=16,
            vae_config=dict(MIXIN_VAE),
            pad_token_id=self.pad_token_id,
        )

    def prepare_config_and_inputs(self):
        config = self.get_config()
        text = torch.randint(FIRST_TEXT_ID, self.vocab_size, (self.batch_size, self.text_length))
        inputs = {}
        if self.with_images:
            c = config
            image = torch.tensor(
                [c.bos_token_id, c.boi_token_id] + [c.image_token_id] * c.image_slots + [c.eoi_token_id]
            )
            input_ids = torch.cat([image.expand(self.batch_size, -1), text], dim=1)
            inputs["image_latents"] = torch.randn(self.batch_size, c.latent_channels, c.latent_size, c.latent_size)
        else:
            input_ids = text
        attention_mask = torch.ones_like(input_ids)
        return config, {"input_ids": input_ids, "attention_mask": attention_mask, **inputs}

    def prepare_config_and_inputs_for_common(self):
        return self.prepare_config_and_inputs()


class _TransfusionMixinCase:
    all_model_classes = (TransfusionModel, TransfusionForCausalLM)
    # test_resize_embeddings / test_mismatched_shapes / test_missing_keys stay on: they apply to us.
    test_torch_exportable = False  # the export tests live in tests/exporters, which the sdist does not ship
    # The mixin dates a model by its config file's copyright line and skips this check before 2023; ours has none,
    # and the check applies (every weight, the VAE's included, must be set by _init_weights).
    test_can_init_all_missing_weights_before_2023 = True
    # The mixins' training loss is the LM loss from `labels`: the diffusion loss belongs to
    # TransfusionDiffusionObjective, outside forward, so the image head (and on text rows the whole image path)
    # gets no gradient from it by design. The gradient-checkpointing checks still compare every gradient there is.
    test_all_params_have_gradient = False
    with_images = False
    batch_size = 2

    @classmethod
    def setUpClass(cls):
        # The mixins pick labels, loss checks and the base-model exemptions by the class names in transformers'
        # static auto mappings, where an in-tree model is listed; `AutoModel.register` (our __init__) fills other
        # tables. List ours there for the duration of the class, as AutoModel / AutoModelForCausalLM have them.
        super().setUpClass()
        for names, class_name in (
            (MODEL_MAPPING_NAMES, "TransfusionModel"),
            (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "TransfusionForCausalLM"),
        ):
            patcher = mock.patch.dict(names, {TransfusionConfig.model_type: class_name})
            patcher.start()
            cls.addClassCleanup(patcher.stop)
        # Random ids drawn by the mixins themselves (e.g. the RoPE-scaling tests) keep off the special ids, as
        # in-tree vision-language testers keep their image token out of random text: an <|image|> id is an image
        # slot, and slots without their latents are refused with a clear error.
        draw = _common.ids_tensor
        patcher = mock.patch.object(
            _common,
            "ids_tensor",
            lambda shape, vocab_size, **kw: draw(shape, vocab_size - FIRST_TEXT_ID, **kw) + FIRST_TEXT_ID,
        )
        patcher.start()
        cls.addClassCleanup(patcher.stop)

    def setUp(self):
        self.model_tester = TransfusionModelTester(self, batch_size=self.batch_size, with_images=self.with_images)
        self.config_tester = ConfigTester(self, config_class=TransfusionConfig, hidden_size=32, num_attention_heads=4)

    def test_generation_tester_mixin_inheritance(self):
        if not HAS_GENERATION_MIXIN or self.with_images:
            # The real GenerationTesterMixin is only in transformers' repository (not its sdist), and it slices
            # input_ids without the images' latents, so it runs on the text case only, from a checkout.
            self.skipTest(
                "GenerationTesterMixin runs on text rows from a transformers checkout (TRANSFORMERS_TESTS_DIR)"
            )
        super().test_generation_tester_mixin_inheritance()


_GENERATION = (GenerationTesterMixin,) if HAS_GENERATION_MIXIN else ()


class TransfusionTextModelTest(_TransfusionMixinCase, ModelTesterMixin, *_GENERATION, unittest.TestCase):
    """Text-only rows: the contract a Llama-style decoder keeps."""

    def test_config(self):
        self.config_tester.run_common_tests()


class TransfusionImageModelTest(_TransfusionMixinCase, ModelTesterMixin, unittest.TestCase):
    """Rows with an image (a clean latent at 4 slots) before the text: the same checks with image inputs."""

    with_images = True
    # The mixins feed their own batches with only the main input unless told: the latents go along with input_ids.
    additional_model_inputs = ["image_latents"]
    # test_eager_matches_sdpa_inference pads every input to 7 rows with random ones (random latents, but ids
    # without image slots); 7 rows of our own keep latents and slots matched.
    batch_size = 7
