"""Training datasets: the registry (:mod:`.base`), the built-in worlds and a user's own data. Importing this package
registers them, in the order the mixture draws them: fashion, shapes, text, edit, chat (:mod:`.instruct`), then user
datasets as given."""

from .base import (
    DATASETS,
    ImageCaptionSource,
    TextSource,
    Source,
    add_dataset_arguments,
    build_sources,
    builtin_names,
    source_names,
    register_dataset,
    rgb_to_tensor,
    tensor_to_rgb,
)
from .fashion_mnist import FASHION_CLASSES, FashionDataset, fashion_caption, fashion_to_tensor, load_fashion_mnist
from .shapes import (
    COLOURS,
    COUNT_WORDS,
    EVAL_CATEGORIES,
    IMAGE_SIZE,
    RELATIONS,
    SHAPES,
    EvalPrompt,
    SceneSpec,
    ShapesDataset,
    heldout_prompts,
    parse_caption,
    place_objects,
    relation_holds,
    render_scene,
    shape_mask,
    shapes_images,
    shapes_scene,
)
from .text import TextDataset, text_corpus
from .instruct import ChatSource, EditSource, edit_example, heldout_edits, heldout_questions, render_objects
from .user_data import DataError, UserDataset

# The recipe of the bundled model: both image worlds and text.
DEFAULT_MIX = {"fashion": 0.4, "shapes": 0.4, "text": 0.2}


def all_captions() -> list[str]:
    """Every caption the two image worlds can produce (fashion + all shapes scenes, train and held-out)."""
    captions = [fashion_caption(i) for i in range(len(FASHION_CLASSES))]
    objects = [(c, s) for c in COLOURS for s in SHAPES]
    captions += [SceneSpec("single", c, s).caption for c, s in objects]
    captions += [SceneSpec("count", c, s, count=k).caption for k in COUNT_WORDS for c, s in objects]
    captions += [
        SceneSpec("relation", c1, s1, relation=r, colour2=c2, shape2=s2).caption
        for c1, s1 in objects
        for r in RELATIONS
        for c2, s2 in objects
        if (c1, s1) != (c2, s2)
    ]
    return captions




__all__ = [
    "COLOURS",
    "ChatSource",
    "EditSource",
    "edit_example",
    "heldout_edits",
    "heldout_questions",
    "render_objects",
    "COUNT_WORDS",
    "DATASETS",
    "DEFAULT_MIX",
    "DataError",
    "EVAL_CATEGORIES",
    "EvalPrompt",
    "FASHION_CLASSES",
    "FashionDataset",
    "IMAGE_SIZE",
    "ImageCaptionSource",
    "RELATIONS",
    "SHAPES",
    "SceneSpec",
    "ShapesDataset",
    "Source",
    "TextDataset",
    "TextSource",
    "UserDataset",
    "add_dataset_arguments",
    "all_captions",
    "build_sources",
    "builtin_names",
    "fashion_caption",
    "fashion_to_tensor",
    "heldout_prompts",
    "load_fashion_mnist",
    "parse_caption",
    "place_objects",
    "register_dataset",
    "relation_holds",
    "render_scene",
    "rgb_to_tensor",
    "shape_mask",
    "shapes_images",
    "shapes_scene",
    "source_names",
    "tensor_to_rgb",
    "text_corpus",
]
