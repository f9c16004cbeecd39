"""A stand-in kubectl for the operator scripts' tests: it records each call and answers from a state dir."""

FAKE_KUBECTL = r'''
import json, os, re, subprocess, sys
state = os.environ["FAKE_KUBECTL_STATE"]
args = sys.argv[1:]
def log(entry):
    with open(state + "/calls.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
def secrets():
    try:
        return json.load(open(state + "/secrets.json"))
    except FileNotFoundError:
        return {}
words, skip = [], False
for a in args:  # the positional words: drop options and the values of those that take one
    if skip:
        skip = False
    elif a in ("-n", "--namespace", "--context", "-o", "-p", "--type", "-c", "--patch-file"):
        skip = True
    elif not a.startswith("-"):
        words.append(a)
if "exec" in args:
    cmd = args[args.index("--") + 1:]
    log({"argv": args})
    # the pod's own port 8000 is the stand-in gateway's here
    cmd = [c.replace("127.0.0.1:8000", "127.0.0.1:" + os.environ["FAKE_GATEWAY_PORT"]) for c in cmd]
    sys.exit(subprocess.run([sys.executable if cmd[0] == "python" else cmd[0], *cmd[1:]]).returncode)
data = sys.stdin.read() if ("/dev/stdin" in " ".join(args)) else ""
log({"argv": args, "stdin": data})
if words[:2] == ["get", "raycluster"]:
    print("gpu-workers 4 2")
elif words[:2] == ["get", "secret"]:
    name = words[2]
    have = secrets().get(name)
    if have is None:
        sys.exit(1)
    m = re.search(r'index \.data "([^"]+)"', " ".join(args))
    if m:
        print(have.get(m.group(1), "<no value>"), end="")
elif words[:3] == ["create", "secret", "generic"]:
    s = secrets()
    s[words[3]] = dict(line.split("=", 1) for line in data.splitlines() if line)
    json.dump(s, open(state + "/secrets.json", "w"))
elif words[:2] == ["patch", "secret"]:
    s = secrets()
    s[words[2]].update(json.loads(data)["stringData"])
    json.dump(s, open(state + "/secrets.json", "w"))
elif words[:2] == ["get", "job"]:
    sys.exit(1)
'''
