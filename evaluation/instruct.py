"""Instruction-following tasks of the evaluation suite (`evaluation.evaluate --tasks edit,instruct,qa`), all on held-out
data of the shapes world (:mod:`training.datasets.instruct`), all scored by the deterministic detector or by exact
match:

- ``edit``      `pipe(instruction, image=source)` on held-out edits (edit kinds and targets never trained), the kinds
  in turn. *Success*: the detector sees the requested change (`evaluation.detector.score_edit`); *preservation*: the
  objects the instruction did not name are still there, same colour, shape and place. Two references: the detector
  on the true edited scene (the ceiling) and on the unchanged source (what "do nothing" scores).
- ``instruct``  instruction-phrased text→image through `pipe.chat`: the held-out GenEval-style prompts of the
  ``shapes`` task phrased as requests ("please draw …"), scored per category as there, and Fashion-MNIST requests
  ("show me a photo of a bag"), scored by the classifier; plus the share of replies that hold an image at all.
- ``qa``        questions about held-out scenes through `pipe.chat` ("what colour is the circle?", "how many
  squares are there?", "is there a blue square?", "what is in this picture?"): exact-match accuracy, per kind.
"""

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from training.datasets import EVAL_CATEGORIES, heldout_prompts
from training.datasets.instruct import EDIT_KINDS, draw_request, heldout_edits, heldout_questions, render_objects

INSTRUCT_TASKS = ("edit", "instruct", "qa")
STREAM_EDIT, STREAM_INSTRUCT = 3, 4
QUESTION_KINDS = {"what colour": "colour", "how many": "count", "is there": "presence"}


def add_arguments(group) -> None:
    group.add_argument("--edit-prompts", type=int, default=100, help="edit: held-out edits (kinds in turn)")
    group.add_argument("--image-guidance", type=float,
                       help="edit: image guidance scale (InstructPix2Pix; default none)")
    group.add_argument("--instruct-prompts", type=int, default=100, help="instruct: held-out requests to draw")
    group.add_argument("--instruct-fashion-per-class", type=int, default=10,
                       help="instruct: Fashion-MNIST requests per class (0: none)")
    group.add_argument("--qa-questions", type=int, default=200, help="qa: questions about held-out scenes")


def _rgb(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, PIL.Image.Image) else image, dtype=np.uint8)


def eval_edit(pipe, args, item_seed) -> tuple[dict, list]:
    from evaluation.detector import detect, score_edit

    edits = heldout_edits(args.edit_prompts, seed=args.data_seed)
    edited = []
    for start in tqdm(range(0, len(edits), args.batch_size), desc="edit", dynamic_ncols=True, mininterval=5):
        batch = edits[start : start + args.batch_size]
        generators = [torch.Generator().manual_seed(item_seed(args.seed, STREAM_EDIT, start + j))
                      for j in range(len(batch))]  # fmt: skip
        edited += list(pipe([e.instruction for e in batch], image=[render_objects(e.source) for e in batch],
                       num_inference_steps=args.steps, guidance_scale=args.guidance,
                       image_guidance_scale=args.image_guidance, generator=generators,
                       output_type="np").images)  # fmt: skip
    edited = [(np.asarray(x) * 255).round().astype(np.uint8) for x in edited]

    def summary(images):
        scores = [score_edit(e, detect(x)) for e, x in zip(edits, images)]
        kinds = {k: [s for e, s in zip(edits, scores) if e.kind == k] for k in EDIT_KINDS}
        mean = lambda key, rows: float(np.mean([s[key] for s in rows])) if rows else None  # noqa: E731
        return {
            "success": mean("success", scores),
            "preserved": mean("preserved", scores),
            "both": float(np.mean([s["success"] and s["preserved"] for s in scores])),
            "success_by_kind": {k: mean("success", v) for k, v in kinds.items()},
            "preserved_by_kind": {k: mean("preserved", v) for k, v in kinds.items()},
        }

    result = {
        "n": len(edits),
        "image_guidance": args.image_guidance,
        **summary(edited),
        "detector_on_targets": summary([render_objects(e.target) for e in edits]),
        "unchanged_source": summary([render_objects(e.source) for e in edits]),
        "examples": [{"instruction": e.instruction, "kind": e.kind} for e in edits[:10]],
    }
    return result, list(zip(edits, edited))


def _draw(pipe, request: str, args, seed: int) -> np.ndarray | None:
    """The first image of the reply to a request to draw, or None when the reply holds none."""
    out = pipe.chat([{"role": "user", "content": request}], max_new_tokens=8, max_images=1,
                    num_inference_steps=args.steps, guidance_scale=args.guidance,
                    generator=torch.Generator().manual_seed(seed))  # fmt: skip
    images = [x for x in out.message["content"] if isinstance(x, PIL.Image.Image)]
    return _rgb(images[0]) if images else None


def eval_instruct(pipe, args, item_seed, ref=None) -> dict:
    from evaluation.detector import detect, score_prompt
    from training.datasets import FASHION_CLASSES, fashion_caption, rgb_to_tensor

    prompts = heldout_prompts(args.instruct_prompts, seed=args.data_seed)
    rng = np.random.default_rng([args.data_seed, 30])
    requests = [draw_request(p.caption, rng) for p in prompts]
    passed, answered = {c: [] for c in EVAL_CATEGORIES}, []
    for i, (prompt, request) in enumerate(tqdm(list(zip(prompts, requests)), desc="instruct", dynamic_ncols=True,
                                               mininterval=5)):  # fmt: skip
        image = _draw(pipe, request, args, item_seed(args.seed, STREAM_INSTRUCT, i))
        answered.append(image is not None)
        passed[prompt.category].append(image is not None and bool(score_prompt(prompt.spec, detect(image))[
            prompt.category]))  # fmt: skip
    categories = {c: float(np.mean(v)) for c, v in passed.items() if v}
    result = {
        "n": len(prompts),
        "answered_with_image": float(np.mean(answered)),
        "overall": float(np.mean(list(categories.values()))),
        "categories": categories,
        "examples": requests[:10],
    }
    if ref is not None and args.instruct_fashion_per_class:
        labels = [c for c in range(len(FASHION_CLASSES)) for _ in range(args.instruct_fashion_per_class)]
        fashion_requests = [draw_request(fashion_caption(c), rng) for c in labels]
        drawn = [_draw(pipe, r, args, item_seed(args.seed, STREAM_INSTRUCT + 10, i))
                 for i, r in enumerate(tqdm(fashion_requests, desc="instruct fashion", mininterval=5))]  # fmt: skip
        blank = np.zeros((32, 32, 3), np.uint8)
        x = torch.cat([rgb_to_tensor(d if d is not None else blank) for d in drawn])
        right = (ref.classifier.predict(x) == torch.tensor(labels)) & torch.tensor([d is not None for d in drawn])
        result["fashion"] = {"n": len(labels), "accuracy": float(right.float().mean()),
                             "answered_with_image": float(np.mean([d is not None for d in drawn]))}  # fmt: skip
    return result


def normalise(answer: str) -> str:
    return " ".join(answer.lower().strip().rstrip(".!?").split())


def eval_qa(pipe, args) -> dict:
    questions = heldout_questions(args.qa_questions, seed=args.data_seed)
    answers = []
    for start in tqdm(range(0, len(questions), args.batch_size), desc="qa", dynamic_ncols=True, mininterval=5):
        batch = questions[start : start + args.batch_size]
        out = pipe.chat([[{"role": "user", "content": [image, question]}] for image, question, _ in batch],
                        max_new_tokens=16, max_images=0)  # fmt: skip
        answers += [" ".join(x for x in m["content"] if isinstance(x, str)) for m in out.message]
    right = [normalise(a) == normalise(truth) for a, (_, _, truth) in zip(answers, questions)]

    def kind(question):
        return next((k for prefix, k in QUESTION_KINDS.items() if question.startswith(prefix)), "describe")

    kinds = {}
    for (_, question, _), ok in zip(questions, right):
        kinds.setdefault(kind(question), []).append(ok)
    return {
        "n": len(questions),
        "accuracy": float(np.mean(right)),
        "by_kind": {k: float(np.mean(v)) for k, v in sorted(kinds.items())},
        "by_kind_n": {k: len(v) for k, v in sorted(kinds.items())},
        "examples": [{"question": q, "true": t, "answer": a} for (_, q, t), a in list(zip(questions, answers))[:12]],
    }


def summary_rows(res: dict) -> dict:
    """The headline rows of the instruction tasks for `evaluation.report.summary_rows`."""
    rows = {}
    if "edit" in res:
        e = res["edit"]
        rows |= {"edit: success": e["success"], "edit: preserved": e["preserved"], "edit: both": e["both"]}
        rows |= {f"edit: success, {k}": v for k, v in e["success_by_kind"].items()}
        rows["edit: success / preserved of the true target"] = (
            f"{e['detector_on_targets']['success']:.3f} / {e['detector_on_targets']['preserved']:.3f}"
        )
        rows["edit: success / preserved of the unchanged source"] = (
            f"{e['unchanged_source']['success']:.3f} / {e['unchanged_source']['preserved']:.3f}"
        )
    if "instruct" in res:
        i = res["instruct"]
        rows["instruct: answered with an image"] = i["answered_with_image"]
        rows["instruct: GenEval overall"] = i["overall"]
        rows |= {f"instruct: {c.replace('_', ' ')}": v for c, v in i["categories"].items()}
        if "fashion" in i:
            rows["instruct: Fashion-MNIST requests, accuracy"] = i["fashion"]["accuracy"]
    if "qa" in res:
        q = res["qa"]
        rows["qa: accuracy"] = q["accuracy"]
        rows |= {f"qa: {k}": v for k, v in q["by_kind"].items()}
    return rows
