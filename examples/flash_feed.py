"""Flash queries over a live price feed, with ``vllm_stateful.client``.

Creates a session whose prompt describes a price feed, registers two flash queries ("trend", "last"), prints
their answers from the session's event stream as the server recomputes them, and appends one tick line every
0.5 s. At the end it reads each query once more (waiting for an answer at least as fresh as the last append),
deletes the session and exits.

The demo model has random weights, so the answers are gibberish; the versions, confidences and timing are real.
"""

import argparse
import random
import threading
import time

from vllm_stateful.client import StatefulClient

parser = argparse.ArgumentParser()
parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
parser.add_argument("--api-key", default=None)
parser.add_argument("--ticks", type=int, default=20)
args = parser.parse_args()

QUERIES = {"trend": "\nQ: Is the price trend up or down?\nA:", "last": "\nQ: What was the last price?\nA:"}
start = time.monotonic()


def watch(client: StatefulClient, session_id: str) -> None:
    """Print flash answers as they arrive; the stream ends when the session is deleted."""
    for event in client.events(session_id):
        if event.name == "flash_answer":
            d = event.data
            print(
                f"  [{time.monotonic() - start:5.2f}s] {d['name']:>5} v{d['version']} "
                f"conf={d.get('confidence') or 0:.2f} {d.get('answer')!r}"
            )
        elif event.name != "appended":
            print(f"  [{time.monotonic() - start:5.2f}s] {event.name} {event.data}")


with StatefulClient(args.base_url, api_key=args.api_key) as client:
    session = client.create_session(prompt="A price feed, one tick per line (t = seconds, price in USD):\n")
    watcher = threading.Thread(target=watch, args=(client, session.id), daemon=True)
    watcher.start()  # subscribe before registering, to see the first answers too
    time.sleep(0.2)
    flash = {
        name: client.register_flash_query(session.id, name=name, prompt=prompt, max_tokens=16, temperature=0)
        for name, prompt in QUERIES.items()
    }
    print(f"session {session.id}: {session.context_tokens} tokens, flash queries {[q.id for q in flash.values()]}")

    price, last_version = 100.0, session.version
    for tick in range(args.ticks):
        price = round(price * (1 + random.gauss(0, 0.01)), 2)
        last_version = client.append(session.id, text=f"t={tick} price={price}\n").version
        print(f"append t={tick} price={price} -> v{last_version}")
        time.sleep(0.5)

    for name, query in flash.items():
        fq = client.get_flash_query(session.id, query.id, min_version=last_version, wait_s=30)
        print(
            f"final {name}: v{fq.version} (session v{last_version}) stale={fq.stale} "
            f"conf={fq.confidence} evaluations={fq.evaluations} {fq.answer!r}"
        )
    print(client.delete_session(session.id))
    watcher.join(timeout=10)
