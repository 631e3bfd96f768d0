"""`llmhost ps`: what each running server (started from this LLMHOST_HOME) has loaded."""

from __future__ import annotations

import json
import sys
from typing import Any

from llmhost.cli.common import console


def server_rows(api_key: str | None) -> list[dict[str, Any]]:
    """Each running server with its loaded models, or why they could not be read."""
    import httpx

    from llmhost.server.run import running_servers

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out = []
    for record in running_servers():
        for url in record.get("urls", []):
            row: dict[str, Any] = {"url": url, "pid": record["pid"], "models": []}
            try:
                r = httpx.get(url + "/api/ps", headers=headers, timeout=5)
            except httpx.HTTPError as err:
                row["error"] = f"not answering ({type(err).__name__})"
            else:
                if r.status_code == 401:
                    row["error"] = "needs its API key: pass --api-key KEY (or set LLMHOST_API_KEY)"
                elif r.status_code != 200:
                    row["error"] = f"answered {r.status_code}"
                else:
                    row.update(r.json())
            out.append(row)
    return out


def show_ps(api_key: str | None, as_json: bool) -> None:
    rows = server_rows(api_key)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    if not rows:
        console.print("no llmhost server is running (from this LLMHOST_HOME)")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in (
        "SERVER",
        "MODEL",
        "KIND",
        "ENGINE",
        "DEVICE",
        "ADAPTERS",
        "MEMORY",
        "RUNNING",
        "QUEUED",
        "IDLE",
        "UNLOADS IN",
    ):
        table.add_column(col)
    for row in rows:
        if "error" in row:
            table.add_row(row["url"], f"[yellow]{row['error']}[/yellow]", *[""] * 9)
            continue
        if not row["models"]:
            table.add_row(row["url"], "(nothing loaded)", *[""] * 9)
        for m in row["models"]:
            table.add_row(
                row["url"],
                m["name"],
                m.get("task", "chat"),
                m["engine"],
                m.get("device", "-") + ("" if m.get("kv_cache", "f16") == "f16" else f", KV {m['kv_cache']}"),
                ", ".join(m["adapters"]) or "-",
                f"{m['memory_gib']:.2f} GiB",
                str(m["running"]),
                str(m["queued"]),
                "busy" if m["leases"] else f"{m['idle_s']:.0f} s",
                "never" if m["expires_in_s"] is None else f"{m['expires_in_s']:.0f} s",
            )
    from rich.console import Console

    Console(highlight=False, width=200).print(table)
