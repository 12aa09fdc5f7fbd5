"""Batch inputs without a model: prompt files (.txt, .jsonl, .csv) and their bad rows, item numbering, seeds and
names, sharding across processes, the launcher's environment and the end summary's arithmetic."""
import json

import pytest

from vidattn.pipelines.distributed import ProcessInfo, process_info, rank_device, shard_items
from vidattn.pipelines.prompts import PromptRow, expand_items, read_prompt_file, rows_from_prompts, slug
from vidattn.pipelines.report import summary, summary_table
from vidattn.validation import UsageError


def test_txt_skips_comments_and_blank_lines_and_keeps_line_numbers(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# a suite\n\n  a red fox  \n#a blue car\na green tree\n\n", encoding="utf-8")
    rows = read_prompt_file(f)
    assert [(r.prompt, r.line) for r in rows] == [("a red fox", 3), ("a green tree", 5)]


def test_jsonl_and_csv_rows_carry_their_fields(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text('{"prompt": "fox", "seed": 9, "num_frames": 17, "height": 32, "width": 48, "id": "fox-1", '
                 '"negative_prompt": "blur"}\n\n{"prompt": "car"}\n', encoding="utf-8")
    first, second = read_prompt_file(j)
    assert first == PromptRow("fox", "blur", 9, 17, 32, 48, "fox-1", line=1)
    assert second == PromptRow("car", line=3)
    c = tmp_path / "p.csv"
    c.write_text('prompt,seed,num_frames,id\n"a fox, running",4,,fox\ncar,,9,\n', encoding="utf-8")
    a, b = read_prompt_file(c)
    assert (a.prompt, a.seed, a.num_frames, a.id, a.line) == ("a fox, running", 4, None, "fox", 2)
    assert (b.prompt, b.seed, b.num_frames, b.id, b.line) == ("car", None, 9, None, 3)


@pytest.mark.parametrize("name, text, fragments", [
    ("p.jsonl", '{"prompt": "ok"}\n{"prompt": "x", "seed": "7"}\n', ["line 2", "'seed'", "integer"]),
    ("p.jsonl", '{"prompt": "ok"}\n\n{"prompt": "x",\n', ["line 3", "not JSON"]),
    ("p.jsonl", '{"negative_prompt": "x"}\n', ["line 1", "'prompt'", "missing"]),
    ("p.jsonl", '{"prompt": "x", "promt": "y"}\n', ["line 1", "'promt'", "not a row field"]),
    ("p.jsonl", '{"prompt": "x", "id": "../etc/x"}\n', ["line 1", "'id'", "safe file name"]),
    ("p.jsonl", '{"prompt": "x", "id": "a"}\n{"prompt": "y", "id": "a"}\n', ["line 2", "'id'", "line 1"]),
    ("p.jsonl", '{"prompt": "x", "num_frames": 0}\n', ["line 1", "'num_frames'", ">= 1"]),
    ("p.jsonl", '["x"]\n', ["line 1", "JSON object"]),
    ("p.csv", "text,seed\nfox,1\n", ["line 1", "'prompt'", "header"]),
    ("p.csv", "prompt,height\nfox,tall\n", ["line 2", "'height'", "integer"]),
    ("p.txt", "# only a comment\n\n", ["holds no prompts"]),
    ("p.txt", "", ["holds no prompts"]),
    ("p.yaml", "prompt: x\n", [".txt, .jsonl, .csv"]),
])
def test_bad_prompt_files_name_the_line_and_field(tmp_path, name, text, fragments):
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError) as err:
        read_prompt_file(f)
    assert err.value.option == "--prompts" and "\n" not in str(err.value)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_missing_folder_and_binary_prompt_files(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00fox")
    for path, fragment in ((tmp_path / "none.txt", "no such file"), (tmp_path, "must end in"),
                           (tmp_path / "bin.txt", "not UTF-8")):
        with pytest.raises(UsageError, match=fragment):
            read_prompt_file(path)
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(UsageError, match="is a folder"):
        read_prompt_file(tmp_path / "dir.txt")


def test_items_seeds_and_names():
    rows = [PromptRow("A Red Fox!"), PromptRow("car", seed=100), PromptRow("tree", id="t1")]
    items = expand_items(rows, base_seed=10)
    assert [(i.index, i.name, i.seed) for i in items] == [(0, "00000-a-red-fox", 10), (1, "00001-car", 100),
                                                          (2, "t1", 12)]
    two = expand_items(rows, base_seed=10, per_prompt=2)
    assert [(i.index, i.name, i.seed, i.copy) for i in two] == [
        (0, "00000-a-red-fox", 10, 0), (1, "00001-a-red-fox", 11, 1), (2, "00002-car", 100, 0),
        (3, "00003-car", 101, 1), (4, "t1-0", 14, 0), (5, "t1-1", 15, 1)]
    assert len({i.name for i in two}) == len(two)
    with pytest.raises(UsageError, match="line 1 and line 2 would both be written as 00000-fox.mp4"):
        expand_items([PromptRow("fox", line=1), PromptRow("b", id="00000-fox", line=2)], 0)
    assert slug("Ünïcode — über  café!") == "unicode-uber-cafe" and slug("!!!") == "video"
    with pytest.raises(UsageError, match="--prompt"):
        rows_from_prompts(["fox", " "])


def test_item_seeds_are_checked_when_expanded(tmp_path):
    """Every expanded seed must fit ``manual_seed``: a row seed + copy names the file, line and field; ``--seed`` +
    index names the item and its seed, not an altered ``--seed``."""
    top = 2 ** 64 - 1
    row = PromptRow("fox", seed=top, line=3)
    assert [i.seed for i in expand_items([row], 0, source=tmp_path / "p.jsonl")] == [top]
    with pytest.raises(UsageError) as err:
        expand_items([row], 0, per_prompt=2, source=tmp_path / "p.jsonl")
    assert err.value.option == "--prompts" and "p.jsonl line 3, field 'seed'" in err.value.message
    assert str(top + 1) in err.value.message
    rows = [PromptRow("a", line=1), PromptRow("b", line=2)]
    assert expand_items(rows[:1], top)[0].seed == top
    with pytest.raises(UsageError) as err:
        expand_items(rows, top)
    assert err.value.option == "--seed" and err.value.message.startswith(f"item 1 (line 2) gets seed {top + 1}")
    assert [i.seed for i in expand_items(rows, -2 ** 63)] == [-2 ** 63, -2 ** 63 + 1]


def test_clearing_an_item_leaves_a_dotted_neighbours_temp_files(tmp_path):
    """``_clear("a")`` removes a's files and the temporary files ``atomic_write`` leaves for them, never those of
    item ``a.b`` (ids may hold dots)."""
    from vidattn.pipelines.batch import _clear, temp_files
    from vidattn.pipelines.video_io import atomic_write

    made = {"a": [], "a.b": []}
    for name in made:
        for folder, suffix in ((tmp_path, ".mp4"), (tmp_path, ".json"), (tmp_path / "dense", ".mp4")):
            atomic_write(folder / f"{name}{suffix}", True, lambda tmp, n=name: made[n].append(tmp))
    for paths in made.values():  # what a killed writer leaves: its temporary files, named as atomic_write names them
        for path in paths:
            path.write_bytes(b"partial")
    assert sorted(temp_files(tmp_path, "a.b")) == sorted(p for p in made["a.b"] if p.parent == tmp_path)
    _clear(tmp_path, "a")
    assert not any(p.exists() for p in made["a"]) and not (tmp_path / "a.mp4").exists()
    assert all(p.exists() for p in made["a.b"]) and (tmp_path / "a.b.mp4").exists()
    assert (tmp_path / "dense" / "a.b.mp4").exists()
    _clear(tmp_path, "a.b")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dense"]


@pytest.mark.parametrize("count, world", [(0, 2), (1, 3), (7, 2), (10, 4), (5, 5)])
def test_shards_cover_every_item_once_and_balance(count, world):
    items = list(range(count))
    shards = [shard_items(items, rank, world) for rank in range(world)]
    assert sorted(i for s in shards for i in s) == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        shard_items(items, world, world)


def test_launcher_environment_and_device_per_process():
    assert process_info({}) == ProcessInfo(0, 1, 0)
    info = process_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert info == ProcessInfo(3, 4, 1) and info.distributed
    assert rank_device("cuda", info) == "cuda:1" and rank_device("cuda:0", info) == "cuda:0"
    assert rank_device("cuda", ProcessInfo()) == "cuda" and rank_device("cpu", info) == "cpu"
    for env in ({"RANK": "2", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "x"}):
        with pytest.raises(ValueError):
            process_info(env)


def test_summary_averages_and_table():
    rows = [
        {"index": 0, "name": "a", "status": "ok", "generate_s": 1.0, "density": 0.5, "dense_generate_s": 3.0,
         "speedup": 3.0, "psnr_db": 30.0, "ssim": 0.9, "identical": False},
        {"index": 1, "name": "b", "status": "ok", "generate_s": 3.0, "density": 0.7, "dense_generate_s": 3.0,
         "speedup": 1.0, "psnr_db": None, "ssim": 1.0, "identical": True},
        {"index": 2, "name": "c", "status": "failed", "error": "RuntimeError: x"},
    ]
    s = summary(rows)
    assert s["ok"] == 2 and s["failed"] == ["c"]
    assert s["speedup"] == pytest.approx(6.0 / 4.0) and s["mean_speedup"] == pytest.approx(2.0)
    assert s["mean_density"] == pytest.approx(0.6) and s["mean_ssim"] == pytest.approx(0.95)
    assert s["mean_psnr_db"] == pytest.approx(30.0) and s["identical"] == 1
    table = summary_table(rows, "dense").splitlines()
    assert len(table) == 2 + 3 + 1 and "| 1 | b | ok | 3.00 | 0.700 | 3.00 | 1.00 | inf | 1.0000 |" in table
    assert table[-1].startswith("|  | **mean of items** | 2/3 ok | 2.00 | 0.600 |  | 2.00 |")  # not the 1.50 ratio
    assert json.dumps(s)  # the manifest's summary line is plain JSON
