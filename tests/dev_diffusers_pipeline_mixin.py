"""Development harness: diffusers' own `PipelineTesterMixin` (and `PipelineLatentTesterMixin`) run against
TransfusionPipeline with a tiny model.

diffusers' tester mixins ship only in its public repository, not in its wheel or source distribution, so this file is
not collected by CI (its name does not match `test_*.py`); every contract the mixins check that applies here is
encoded in tests/test_pipeline_contracts.py, which CI runs. Run it during development:

    # from a git checkout or bare mirror of huggingface/diffusers (extracts the needed files once):
    DIFFUSERS_GIT_DIR=/path/to/diffusers/.git pytest tests/dev_diffusers_pipeline_mixin.py -q
    # or from a folder already holding the extracted package (diffusers_tests/pipelines/test_pipelines_common.py, …):
    DIFFUSERS_TESTS_DIR=.cache/diffusers-tests pytest tests/dev_diffusers_pipeline_mixin.py -q

The files are extracted into `.cache/diffusers-tests/diffusers_tests/` (git-ignored) from the repository's HEAD
(`DIFFUSERS_GIT_REF` to choose another commit). The package is renamed `diffusers_tests` so that it cannot collide
with this repository's `tests/`. Two modules that the common file imports only for IP-Adapter mixins (flux and UNet
model tests, which pull in diffusers' whole model-test tree) are replaced by stubs; nothing here uses them.
"""

import os
import subprocess
import sys
import unittest
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "diffusers-tests"
DEFAULT_GIT_DIR = "/work/.mirror/huggingface+diffusers/repo"
FILES = {  # path in diffusers' repository → path in the extracted package
    "tests/testing_utils.py": "testing_utils.py",
    "tests/pipelines/test_pipelines_common.py": "pipelines/test_pipelines_common.py",
    "tests/pipelines/pipeline_params.py": "pipelines/pipeline_params.py",
    "tests/models/autoencoders/vae.py": "models/autoencoders/vae.py",
}
STUBS = {  # imported by test_pipelines_common for its IP-Adapter mixins only
    "models/transformers/test_models_transformer_flux.py": "def create_flux_ip_adapter_state_dict(*args, **kwargs):\n"
    "    raise NotImplementedError('IP-Adapter helpers are not extracted')\n",
    "models/unets/test_models_unet_2d_condition.py": "def create_ip_adapter_state_dict(*args, **kwargs):\n"
    "    raise NotImplementedError('IP-Adapter helpers are not extracted')\n\n\n"
    "create_ip_adapter_faceid_state_dict = create_ip_adapter_state_dict\n",
}


def _extract(target: Path) -> None:
    git_dir = os.environ.get("DIFFUSERS_GIT_DIR", DEFAULT_GIT_DIR)
    ref = os.environ.get("DIFFUSERS_GIT_REF", "HEAD")
    package = target / "diffusers_tests"
    for source, dest in FILES.items():
        text = subprocess.run(["git", "--git-dir", git_dir, "show", f"{ref}:{source}"], check=True,
                              capture_output=True, text=True).stdout  # fmt: skip
        (package / dest).parent.mkdir(parents=True, exist_ok=True)
        (package / dest).write_text(text)
    for dest, text in STUBS.items():
        (package / dest).parent.mkdir(parents=True, exist_ok=True)
        (package / dest).write_text(text)
    for folder in [package, *[p for p in package.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()


def _tests_dir() -> Path | None:
    if os.environ.get("DIFFUSERS_TESTS_DIR"):
        return Path(os.environ["DIFFUSERS_TESTS_DIR"]).resolve()
    if not (CACHE / "diffusers_tests" / "pipelines" / "test_pipelines_common.py").is_file():
        try:
            _extract(CACHE)
        except (OSError, subprocess.CalledProcessError):
            return None
    return CACHE


_DIR = _tests_dir()
if _DIR is None:
    pytest.skip(
        "diffusers' test files not found: set DIFFUSERS_GIT_DIR or DIFFUSERS_TESTS_DIR", allow_module_level=True
    )
sys.path.insert(0, str(_DIR))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import TOKENIZER_TEXT, tiny_model  # noqa: E402
from diffusers import DDIMScheduler  # noqa: E402
from diffusers_tests.pipelines.pipeline_params import TEXT_TO_IMAGE_BATCH_PARAMS, TEXT_TO_IMAGE_PARAMS  # noqa: E402
from diffusers_tests.pipelines.test_pipelines_common import (  # noqa: E402
    PipelineLatentTesterMixin,
    PipelineTesterMixin,
)

from modeling_transfusion import build_tokenizer  # noqa: E402
from pipelines import TransfusionPipeline  # noqa: E402

_TOKENIZER = build_tokenizer(TOKENIZER_TEXT, vocab_size=300)


class TransfusionPipelineMixinTests(PipelineLatentTesterMixin, PipelineTesterMixin, unittest.TestCase):
    pipeline_class = TransfusionPipeline
    # no prompt embeddings: the prompt is prefilled by the transformer itself, whose KV cache is the "encoding"
    params = TEXT_TO_IMAGE_PARAMS - {"prompt_embeds", "negative_prompt_embeds", "cross_attention_kwargs"}
    batch_params = TEXT_TO_IMAGE_BATCH_PARAMS
    image_params = frozenset()  # text → image only: no image inputs
    image_latents_params = frozenset()
    callback_cfg_params = frozenset(["latents"])
    test_attention_slicing = False  # attention runs in the transformers model (sdpa/eager), not diffusers processors
    test_xformers_attention = False
    test_layerwise_casting = False
    test_group_offloading = False

    def get_dummy_components(self):
        # 1024 positions: the mixin's batch tests use a 900-character prompt, and the pipeline refuses prompts longer
        # than the model's positions (the tiny preset has 256)
        model = tiny_model(max_position_embeddings=1024)
        return {
            "transformer": model,
            "scheduler": DDIMScheduler.from_config(model.config.scheduler_config()),
            "tokenizer": _TOKENIZER,
        }

    def get_dummy_inputs(self, device, seed=0):
        return {
            "prompt": "a red circle to the left of a blue square",
            "generator": torch.Generator("cpu").manual_seed(seed),
            "num_inference_steps": 2,
            "guidance_scale": 3.0,
            "output_type": "np",
        }

    # -- what does not apply, each with its reason ------------------------------------------------------------------
    @unittest.skip("the text encoder is the transformer itself: encode_prompt returns token ids that are prefilled "
                   "into the denoiser's KV cache, and __call__ takes no prompt_embeds; a pipeline without the "
                   "transformer cannot exist (it also owns the VAE)")  # fmt: skip
    def test_encode_prompt_works_in_isolation(self):
        pass

    @unittest.skip("the VAE is inside the transformers model (config.vae_config): a pipeline cannot be built with "
                   "another VAE class, and `pipe.vae` is a property")  # fmt: skip
    def test_multi_vae(self):
        pass


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
