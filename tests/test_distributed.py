"""Two CPU ranks (gloo under torchrun) give the same scores and selection as one process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from grape_plugin import GrapeConfig, run
    from grape_plugin.distributed import rank_world

    dist.init_process_group("gloo")
    data, sel = run(sys.argv[1], GrapeConfig(model=sys.argv[2], cache_dir=sys.argv[3], batch_tokens=512))
    rank, world = rank_world()
    out = {"world": world, "mine": sel.stats.scored_by_this_rank, "kept": sel.kept,
           "scores": {f"{k}/{i}": s.mean for (k, i), s in sel.scores.items()}}
    with open(f"{sys.argv[4]}.{rank}.json", "w") as fh:
        json.dump(out, fh)
    dist.destroy_process_group()
""")


def test_two_ranks_match_one(tmp_path, tiny_model, pool_file):
    from grape_plugin import GrapeConfig, run

    script = tmp_path / "score.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), str(pool_file), str(tiny_model), str(tmp_path / "cache2"), str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}.json").read_text()) for r in (0, 1)]
    _, single = run(pool_file, GrapeConfig(model=str(tiny_model), cache_dir=None))
    expected = {f"{k}/{i}": s.mean for (k, i), s in single.scores.items()}
    for got in ranks:
        assert got["world"] == 2 and got["kept"] == {k: list(v) for k, v in single.kept.items()}
        assert got["scores"].keys() == expected.keys()
        assert max(abs(got["scores"][k] - expected[k]) for k in expected) < 1e-5
    # each rank scored its own share of the instructions, into one shared cache
    assert 0 < ranks[0]["mine"] < len(expected) and ranks[0]["mine"] + ranks[1]["mine"] == len(expected)
    from grape_plugin.cache import records

    parts = list((tmp_path / "cache2").glob("*/*.grs"))  # one file per rank, each with only its own records
    assert len(parts) == 2 and sum(1 for p in parts for _ in records(p)) == len(expected)
    # one rank resumes from what two wrote: every score comes from the cache, the selection is the same
    _, resumed = run(pool_file, GrapeConfig(model=str(tiny_model), cache_dir=tmp_path / "cache2"))
    assert (resumed.stats.scored, resumed.stats.cached, resumed.kept) == (0, len(expected), single.kept)


FAILING = textwrap.dedent("""
    import os
    import sys
    import torch.distributed as dist
    from grape_plugin import GrapeConfig, GrapeError, hookimpl, run
    from grape_plugin.plugins import load_plugins
    from grape_plugin.render import paper_renderer

    class Picky:
        @hookimpl
        def grape_register_renderers(self, register):
            def factory(tokenizer, cfg):
                paper = paper_renderer(tokenizer)

                def render(group, cand):
                    if group.key == "ae-001":
                        raise GrapeError("cannot render this one")
                    return paper(group, cand)
                return render
            register("picky", factory)

    load_plugins().register(Picky())
    dist.init_process_group("gloo")
    try:
        run(sys.argv[1], GrapeConfig(model=sys.argv[2], cache_dir=None, template="picky"))
    except GrapeError as exc:
        os.write(1, f"rank {dist.get_rank()}: {exc}\\n".encode())  # one write: the ranks share the pipe
        dist.barrier()  # both ranks have printed before either exits (torchrun stops the rest at the first exit)
        sys.exit(2)
""")


def test_an_error_on_one_rank_stops_every_rank(tmp_path, tiny_model, pool_file):
    """Each rank renders its own instructions: a bad one on one rank must not leave the other waiting forever."""
    script = tmp_path / "fail.py"
    script.write_text(FAILING)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), str(pool_file), str(tiny_model)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("rank "))
    assert [line[:7] for line in lines] == ["rank 0:", "rank 1:"]
    assert all(line.endswith("pool.jsonl: row 9: field 'response': cannot render this one") for line in lines)
