"""The plot of `absorber bench --plot`: RSS against tokens seen, one line per engine (matplotlib, extra `eval`)."""
from __future__ import annotations


def plot(res: dict, path: str) -> None:
    """Write res["rss_curves"] (the curves of `absorber.bench.speed`'s rss-* tasks) as a PNG to path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in res.get("rss_curves", []):
        if "curve" in c:
            xs, ys = zip(*c["curve"])
            ax.plot(xs, ys, label=c.get("label", c["engine"]))
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("RSS (MB)")
    ax.set_title("Memory against stream length")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
