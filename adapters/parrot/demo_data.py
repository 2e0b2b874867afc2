"""The Parrot demo's data: multilingual visual questions on real images a package ships, in LLaVA's
JSON format, with a fixed train/test split (ALGORITHMS.md §5; issue #14 point 5).

Images: scikit-learn's handwritten digits (1,797 scans, 8x8, 17 grey levels), upscaled to 64x64
and inked in one of three colours on white. Questions: which digit, which colour, even or odd, each
asked in English, Chinese, Portuguese, Arabic, Turkish and Russian (MMMB's languages) and answered
with one word **in the question's language**, so accuracy is an exact match and the text (the
language) is what tells a text-guided mixture which expert to use. The split is by scan: no test
image (nor any other colouring of its scan) is seen in training.

    python -m adapters.parrot.demo_data runs/parrot-data            # train.json, test.json, images/
    build_demo_data(out, train_per_language=600, test_per_language=100, seed=0) -> DemoData

A record: ``{"id", "image": "images/digit0042_red.png", "conversations": [{"from": "human",
"value": "<image>\\n<question>"}, {"from": "gpt", "value": "<answer>"}], "language", "task", "answer"}``
(``image`` relative to the JSON's folder, as LLaVA's image folder argument expects). Same arguments,
same bytes.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

LANGUAGES = ("en", "zh", "pt", "ar", "tr", "ru")
TASKS = ("digit", "colour", "parity")
IMAGE_SIDE = 64
INKS = {"red": (220, 30, 30), "green": (20, 160, 40), "blue": (30, 60, 220)}
TEST_EVERY = 5  # scans whose index is a multiple of 5 are the test split

QUESTIONS = {
    "digit": {
        "en": "Which digit is shown in the image? Answer with one word.",
        "zh": "图中显示的是哪个数字？请用一个词回答。",
        "pt": "Qual dígito aparece na imagem? Responda com uma palavra.",
        "ar": "ما الرقم الظاهر في الصورة؟ أجب بكلمة واحدة.",
        "tr": "Resimde hangi rakam var? Tek kelimeyle cevap ver.",
        "ru": "Какая цифра изображена на картинке? Ответь одним словом.",
    },
    "colour": {
        "en": "What colour is the digit? Answer with one word.",
        "zh": "这个数字是什么颜色？请用一个词回答。",
        "pt": "De que cor é o dígito? Responda com uma palavra.",
        "ar": "ما لون الرقم؟ أجب بكلمة واحدة.",
        "tr": "Rakam ne renk? Tek kelimeyle cevap ver.",
        "ru": "Какой цвет у цифры? Ответь одним словом.",
    },
    "parity": {
        "en": "Is the digit even or odd? Answer with one word.",
        "zh": "这个数字是偶数还是奇数？请用一个词回答。",
        "pt": "O dígito é par ou ímpar? Responda com uma palavra.",
        "ar": "هل الرقم زوجي أم فردي؟ أجب بكلمة واحدة.",
        "tr": "Rakam çift mi tek mi? Tek kelimeyle cevap ver.",
        "ru": "Цифра чётная или нечётная? Ответь одним словом.",
    },
}
DIGITS = {
    "en": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "zh": ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九"],
    "pt": ["zero", "um", "dois", "três", "quatro", "cinco", "seis", "sete", "oito", "nove"],
    "ar": ["صفر", "واحد", "اثنان", "ثلاثة", "أربعة", "خمسة", "ستة", "سبعة", "ثمانية", "تسعة"],
    "tr": ["sıfır", "bir", "iki", "üç", "dört", "beş", "altı", "yedi", "sekiz", "dokuz"],
    "ru": ["ноль", "один", "два", "три", "четыре", "пять", "шесть", "семь", "восемь", "девять"],
}
COLOURS = {
    "en": {"red": "red", "green": "green", "blue": "blue"},
    "zh": {"red": "红色", "green": "绿色", "blue": "蓝色"},
    "pt": {"red": "vermelho", "green": "verde", "blue": "azul"},
    "ar": {"red": "أحمر", "green": "أخضر", "blue": "أزرق"},
    "tr": {"red": "kırmızı", "green": "yeşil", "blue": "mavi"},
    "ru": {"red": "красный", "green": "зелёный", "blue": "синий"},
}
PARITY = {  # (even, odd)
    "en": ("even", "odd"), "zh": ("偶数", "奇数"), "pt": ("par", "ímpar"),
    "ar": ("زوجي", "فردي"), "tr": ("çift", "tek"), "ru": ("чётная", "нечётная"),
}


@dataclass(frozen=True)
class DemoData:
    train: Path  # train.json
    test: Path  # test.json
    images: Path  # the images/ folder both refer to
    counts: dict[str, int]  # records per split


def answer(task: str, language: str, digit: int, colour: str) -> str:
    if task == "digit":
        return DIGITS[language][digit]
    if task == "colour":
        return COLOURS[language][colour]
    return PARITY[language][digit % 2]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images [1797, 8, 8] in 0..16, labels [1797]."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits  # noqa: PLC0415
    except ImportError:
        raise RuntimeError("the demo data needs scikit-learn: pip install 'moleserve[vision]'") from None
    digits = sk_load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def render(scan: np.ndarray, colour: str) -> Image.Image:
    """An 8x8 scan (0..16) -> a 64x64 RGB image, ink of ``colour`` on white."""
    ink = (scan / 16.0)[..., None]
    rgb = (1.0 - ink) * 255.0 + ink * np.asarray(INKS[colour], dtype=np.float32)
    small = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    return small.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BICUBIC)


def build_demo_data(out: str | Path, *, train_per_language: int = 600, test_per_language: int = 100,
                    seed: int = 0) -> DemoData:
    """Write ``out/train.json``, ``out/test.json`` and ``out/images/``; tasks rotate evenly per language."""
    out = Path(out)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    scans, labels = load_digits()
    index = np.arange(len(labels))
    pools = {"train": index[index % TEST_EVERY != 0], "test": index[index % TEST_EVERY == 0]}
    sizes = {"train": train_per_language, "test": test_per_language}
    rng = np.random.default_rng(seed)
    written: set[str] = set()
    counts = {}
    for split in ("train", "test"):
        records = []
        for language in LANGUAGES:
            picks = rng.choice(pools[split], size=sizes[split], replace=sizes[split] > len(pools[split]))
            colours = rng.integers(0, len(INKS), size=sizes[split])
            for j, (scan_index, colour_index) in enumerate(zip(picks.tolist(), colours.tolist())):
                task = TASKS[j % len(TASKS)]
                colour = list(INKS)[colour_index]
                name = f"digit{scan_index:04d}_{colour}.png"
                if name not in written:
                    render(scans[scan_index], colour).save(images_dir / name, optimize=False)
                    written.add(name)
                reply = answer(task, language, int(labels[scan_index]), colour)
                records.append({
                    "id": f"{split}-{language}-{j:05d}",
                    "image": f"images/{name}",
                    "conversations": [{"from": "human", "value": f"<image>\n{QUESTIONS[task][language]}"},
                                      {"from": "gpt", "value": reply}],
                    "language": language, "task": task, "answer": reply,
                })
        (out / f"{split}.json").write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        counts[split] = len(records)
    return DemoData(train=out / "train.json", test=out / "test.json", images=images_dir, counts=counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train-per-language", type=int, default=600)
    parser.add_argument("--test-per-language", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = build_demo_data(args.out, train_per_language=args.train_per_language,
                           test_per_language=args.test_per_language, seed=args.seed)
    print(f"{data.train} ({data.counts['train']} records), {data.test} ({data.counts['test']}), images in {data.images}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
