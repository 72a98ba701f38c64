"""A stateful chat with the plain `openai` SDK: each turn sends only its new message."""

import argparse

import httpx
from openai import OpenAI

parser = argparse.ArgumentParser()
parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
parser.add_argument("--session", default="demo-session")
args = parser.parse_args()

client = OpenAI(base_url=args.base_url, api_key="unused")
model = client.models.list().data[0].id
turns = [
    [{"role": "system", "content": "You are a travel planner."}, {"role": "user", "content": "Plan 3 days in Rome."}],
    [{"role": "user", "content": "Make day 2 cheaper."}],
    [{"role": "user", "content": "Now add a museum to day 3."}],
]
for new_messages in turns:  # only the new messages, every turn
    reply = client.chat.completions.create(
        model=model, messages=new_messages, max_tokens=16, temperature=0, extra_body={"stateful": args.session}
    )
    session = reply.model_extra["session"]
    print(
        f"sent {reply.usage.prompt_tokens} new tokens, context {session['context_tokens']}, "
        f"recomputed {session['recomputed_tokens']}: {reply.choices[0].message.content!r}"
    )
print(httpx.delete(f"{args.base_url}/sessions/{args.session}").json())
