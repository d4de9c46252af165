"""A million-row parquet file through `lorakit train`'s data path: every row's shape
checked (before the tokenizer loads), then tokenized with SmolLM2's tokenizer, each in a
fresh process, reporting time and peak RSS.

    python bench/bench_data.py [--rows 1000000] [--columns]

Each phase runs in its own process, so its peak RSS is its own (the tokenizer and
pyarrow included). For scale, the same examples held as Python lists of ints (what a
naive loader keeps) are sized with sys.getsizeof on a sample.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the model reads a question and answers it in a short sentence about the weather today in "
         "Stockholm Gothenburg Malmo Uppsala with rain sun snow wind").split()


def write_parquet(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import random

    generator = random.Random(0)
    writer = None
    for start in range(0, rows, 100_000):
        count = min(100_000, rows - start)
        questions = [" ".join(generator.choices(WORDS, k=generator.randint(6, 20))) for _ in range(count)]
        answers = [" ".join(generator.choices(WORDS, k=generator.randint(4, 30))) for _ in range(count)]
        table = pa.table({"question": questions, "answer": answers, "id": list(range(start, start + count))})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def phase(name: str, path: str, columns: str) -> None:
    """One phase in this process; prints a JSON line with its time and peak RSS."""
    from lorakit.training.data import build_dataset, check_records
    from lorakit.training.sources import Source, parse_columns

    source = Source(path, columns=tuple(parse_columns(columns).items()))
    start = time.perf_counter()
    if name == "check":
        formats = check_records(source.records(), path)
        result = {"records": sum(formats.values())}
    else:
        from lorakit.pretrained import load_tokenizer

        tokenizer = load_tokenizer("smollm2-135m")
        start = time.perf_counter()
        dataset = build_dataset(source.records(), tokenizer, 512, source=path)
        tokens = dataset.tokens
        sample = dataset.examples[:1000]
        as_lists = sum(sys.getsizeof(list(e.input_ids)) + sys.getsizeof(list(e.labels))
                       + sum(sys.getsizeof(t) for t in e.input_ids) + sum(sys.getsizeof(t) for t in e.labels)
                       for e in sample) / len(sample) * len(dataset.examples)
        held = sum(sys.getsizeof(e.input_ids) + sys.getsizeof(e.labels) + sys.getsizeof(e) for e in sample) \
            / len(sample) * len(dataset.examples)
        result = {"examples": len(dataset.examples), "tokens": tokens, "held_mib": held / 2**20,
                  "as_int_lists_mib": as_lists / 2**20}
    result |= {"phase": name, "seconds": time.perf_counter() - start,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--phase", choices=("check", "tokenize"))
    parser.add_argument("--path")
    args = parser.parse_args()
    columns = "prompt=question,completion=answer"
    if args.phase:
        phase(args.phase, args.path, columns)
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.parquet"
        write_parquet(path, args.rows)
        print(f"{args.rows:,} rows, {path.stat().st_size / 2**20:.1f} MiB of parquet; --columns {columns}")
        for name in ("check", "tokenize"):
            out = subprocess.run([sys.executable, __file__, "--phase", name, "--path", str(path)],
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            extra = (f"; {result['examples']:,} examples, {result['tokens']:,} tokens held in "
                     f"{result['held_mib']:,.0f} MiB (as Python int lists: {result['as_int_lists_mib']:,.0f} MiB)"
                     if name == "tokenize" else "")
            print(f"{name:9s} {result['seconds']:7.1f} s  peak RSS {result['peak_rss_mib']:,.0f} MiB{extra}")


if __name__ == "__main__":
    main()
