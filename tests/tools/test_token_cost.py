from tools import token_cost


def test_token_counts_and_costs_per_method(capsys):
    rows = token_cost.main(["--methods", "svit", "dge", "--size", "64", "96", "--runs", "1"])
    svit, dge = rows
    # 4 x 6 tokens through each of the 9 gated blocks; at the targets int(24 * share) + 1 of them
    assert svit["tokens_full"] == 9 * 24
    assert svit["tokens_op"] == 3 * (int(24 * 0.7) + 1) + 3 * (int(24 * 0.49) + 1) + 3 * (int(24 * 0.343) + 1)
    assert 0 < dge["tokens_op"] < dge["tokens_full"]
    for r in rows:
        assert min(r["dense_s"], r["full_s"], r["op_s"]) > 0
        assert r["per_token_ratio"] == r["sparse_ms_per_1k"] / r["dense_ms_per_1k"]
    assert len(capsys.readouterr().out.splitlines()) == 3  # header and a row per method
