"""Reference numbers for `zoo eval caption` from pycocoevalcap itself.

Writes tests/fixtures/caption_metrics/:
  references.json   COCO captions format, 30 images x 5 captions
  references.csv    the same captions as image,caption rows
  predictions.json  `zoo caption --json` style: [{"image": "val/<file_name>", "caption": ...}]
  predictions_coco.json  the same predictions in COCO results format (image_id)
  expected.json     pycocoevalcap's Bleu_1..4 and CIDEr, and its PTB tokenization of every
                    caption (the Stanford PTBTokenizer jar, then its punctuation removed)

Captions are varied on purpose: punctuation, clitics, numbers, brackets, upper case. Some
predictions are good, some bad, one is only punctuation (empty after tokenization).

Setup (Java is needed for the tokenizer jar pycocoevalcap ships):
    python3 -m venv /tmp/coco && /tmp/coco/bin/pip install pycocoevalcap
    /tmp/coco/bin/python scripts/make_caption_metric_fixtures.py
"""

import csv
import json
import os
import random

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "caption_metrics")

SUBJECTS = [
    ("a man", "the man"), ("a woman", "the woman"), ("two dogs", "the dogs"),
    ("a little girl", "the girl"), ("three people", "the people"), ("a cat", "the cat"),
    ("a young boy", "the boy"), ("an old man's dog", "the dog"), ("a group of kids", "the kids"),
    ("a brown horse", "the horse"),
]
ACTIONS = [
    "riding a bike", "sitting on a bench", "playing with a frisbee", "eating a slice of pizza",
    "standing next to a red car", "walking down the street", "holding an umbrella",
    "looking at a computer screen", "running on the beach", "sleeping on a couch",
]
PLACES = [
    "in the park", "near the ocean", "at night", "in a kitchen", "on a snowy hill",
    "in front of a building", "at the zoo", "under a tree", "by the lake", "in the city",
]
EXTRAS = [
    "", "", ".", ".", "!", " (in color).", ", it's sunny.", "; they're happy.",
    " -- isn't it nice?", ' with 2 "friends".', " at 10:30.", " and a sign that says \"STOP\".",
    " for 3.5 hours.", ", who can't stop smiling.", " near Mr. Smith's house.",
    " - a well-known spot.", " with 1,000 birds...", " (about 5 feet tall)",
]


def caption(rng, subject, action, place, capitalize=True):
    text = f"{subject} {action} {place}{rng.choice(EXTRAS)}"
    if capitalize and rng.random() < 0.7:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.1:
        text = text.upper()
    return text


def main():
    rng = random.Random(20240611)
    os.makedirs(OUT, exist_ok=True)
    images, annotations, predictions = [], [], []
    for i in range(30):
        image_id = 1000 + 7 * i
        file_name = f"COCO_val2014_{image_id:012d}.jpg"
        images.append({"id": image_id, "file_name": file_name})
        s, a, p = rng.randrange(len(SUBJECTS)), rng.randrange(len(ACTIONS)), rng.randrange(len(PLACES))
        for j in range(5):
            # References mostly agree on the content, with paraphrases.
            subject = SUBJECTS[s][j % 2] if rng.random() < 0.8 else rng.choice(SUBJECTS)[0]
            action = ACTIONS[a] if rng.random() < 0.8 else rng.choice(ACTIONS)
            place = PLACES[p] if rng.random() < 0.6 else rng.choice(PLACES)
            annotations.append({"id": len(annotations), "image_id": image_id,
                                "caption": caption(rng, subject, action, place)})
        quality = i % 5
        if i == 13:
            pred = " ... !"  # only punctuation: empty after tokenization
        elif quality in (0, 1):  # good
            pred = caption(rng, SUBJECTS[s][0], ACTIONS[a], PLACES[p])
        elif quality == 2:  # partly right
            pred = caption(rng, SUBJECTS[s][0], rng.choice(ACTIONS), rng.choice(PLACES))
        elif quality == 3:  # wrong
            pred = caption(rng, rng.choice(SUBJECTS)[0], rng.choice(ACTIONS), rng.choice(PLACES))
        else:  # short or degenerate
            pred = rng.choice([SUBJECTS[s][0], "a a a a a", f"{SUBJECTS[s][0]} {ACTIONS[a]}",
                               "a picture of something"])
        predictions.append({"image": f"val/{file_name}", "caption": pred})

    gts = {img["id"]: [] for img in images}
    for ann in annotations:
        gts[ann["image_id"]].append({"caption": ann["caption"]})
    res = {img["id"]: [{"caption": p["caption"]}] for img, p in zip(images, predictions)}

    tokenizer = PTBTokenizer()
    gts_tok = tokenizer.tokenize(gts)
    res_tok = tokenizer.tokenize(res)
    # pycocoevalcap zips tokenizer output lines with captions; check none went missing.
    assert all(len(gts_tok[k]) == 5 for k in gts), "the tokenizer lost a reference line"
    assert all(len(res_tok[k]) == 1 for k in res), "the tokenizer lost a prediction line"

    bleu, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
    cider, _ = Cider().compute_score(gts_tok, res_tok)
    tokens = {}
    for k in gts:
        for raw, tok in zip(gts[k] + res[k], gts_tok[k] + res_tok[k]):
            tokens[raw["caption"]] = tok

    expected = {
        "Bleu_1": bleu[0], "Bleu_2": bleu[1], "Bleu_3": bleu[2], "Bleu_4": bleu[3],
        "CIDEr": float(cider), "n": len(images),
        "tokenized": [{"caption": raw, "tokens": tok} for raw, tok in tokens.items()],
    }
    with open(os.path.join(OUT, "references.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations}, f, indent=1)
    with open(os.path.join(OUT, "references.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        by_id = {img["id"]: img["file_name"] for img in images}
        for ann in annotations:
            w.writerow([by_id[ann["image_id"]], ann["caption"]])
    with open(os.path.join(OUT, "predictions.json"), "w") as f:
        json.dump(predictions, f, indent=1)
    with open(os.path.join(OUT, "predictions_coco.json"), "w") as f:
        json.dump([{"image_id": img["id"], "caption": p["caption"]}
                   for img, p in zip(images, predictions)], f, indent=1)
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    print({k: v for k, v in expected.items() if k != "tokenized"})


if __name__ == "__main__":
    main()
