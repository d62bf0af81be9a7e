"""rtrain.yaml -> Project: every key, per-host overrides, and one error line with the file and
line for what is wrong; `rtrain init`'s starter parses."""
import pytest

from launcher import project
from launcher.errors import ConfigError, RtrainError

FULL = """\
project: gpt-small
run: python3 train.py --lr 3e-4
gpus: 2
host: tower
env:
  PATH: /opt/x/bin:$PATH
  SEED: 3
  FLAG: true
setup:
  - pip install -r requirements.txt
  - pip install -e ./vendor/lib
setup_files: [requirements.txt, vendor/lib/pyproject.toml]
python: python3.11
shell: login
data: [data/shakespeare_char/, ./data/extra]
mounts:
  data/imagenet: /datasets/imagenet
outputs: out
hosts:
  cloud:
    venv: /opt/venvs/torch
    env: {HF_HOME: /scratch/hf}
"""


def write(tmp_path, text):
    (tmp_path / "rtrain.yaml").write_text(text)
    return tmp_path


def test_every_key(tmp_path):
    p = project.load(str(write(tmp_path, FULL)))
    assert p.project == "gpt-small" and p.run == ("python3 train.py --lr 3e-4",) and p.gpus == 2
    assert p.env == (("PATH", "/opt/x/bin:$PATH"), ("SEED", "3"), ("FLAG", "true"))
    assert p.setup == "pip install -r requirements.txt\npip install -e ./vendor/lib"
    assert p.data == ("data/shakespeare_char", "data/extra") and p.outputs == ("out",)
    assert p.mounts == (("data/imagenet", "/datasets/imagenet"),) and p.shell == "login"
    cloud = p.for_host("cloud")
    assert cloud.venv == "/opt/venvs/torch" and cloud.setup is None
    assert dict(cloud.env)["HF_HOME"] == "/scratch/hf" and dict(cloud.env)["SEED"] == "3"
    assert p.for_host("tower") is p


def test_no_file_and_default_name(tmp_path):
    d = tmp_path / "my proj!"
    d.mkdir()
    p = project.load(str(d))
    assert p.path is None and p.project == "my-proj-" and p.run is None


@pytest.mark.parametrize("text,line,needle", [
    ("run: x\ngpu: 1\n", 2, "unknown key 'gpu'"),
    ("run: x\ngpus: two\n", 2, "'gpus' must be"),
    ("run: x\ngpus: -1\n", 2, "'gpus' must be"),
    ("env:\n  PATH: [a]\n", 2, "'env' must be"),
    ("shell: zsh\n", 1, "'shell' must be"),
    ("data:\n  - ../elsewhere\n", 2, "not a path inside the project"),
    ("data: [/abs]\n", 1, "not a path inside the project"),
    ("mounts:\n  data/x: relative/path\n", 2, "must be absolute"),
    ("run: [a\n", 2, "YAML syntax error"),
    ("hosts:\n  tower:\n    setup: x\n", 3, "unknown key 'setup' under hosts: tower"),
])
def test_errors_say_file_and_line(tmp_path, text, line, needle):
    with pytest.raises(ConfigError) as e:
        project.load(str(write(tmp_path, text)))
    assert "rtrain.yaml:%d" % line in e.value.message and needle in e.value.message


@pytest.mark.parametrize("text,needle", [
    ("venv: /v\nsetup: pip install x\n", "cannot go together"),
    ("venv: /v\nconda_env: base\n", "cannot go together"),
    ("data: [data]\noutputs: [data/out]\n", "overlap"),
])
def test_conflicting_keys(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        project.load(str(write(tmp_path, text)))
    assert needle in e.value.message and "rtrain.yaml" in e.value.message


def test_init_writes_a_starter_that_parses(tmp_path):
    path = project.write_starter(str(tmp_path))
    p = project.parse(path)
    assert p.run == ("python3 train.py",) and p.setup == "pip install -r requirements.txt"
    with pytest.raises(RtrainError):
        project.write_starter(str(tmp_path))


def test_notify_and_stall_in_the_project_file_win_over_the_hosts(tmp_path):
    from launcher import config
    from launcher.submit import _watch
    p = project.load(write(tmp_path, "notify: {url: 'https://hooks.example/x', format: slack, on: [failed]}\n"
                                     "stall_after: 20m\non_stall: cancel\n"))
    assert p.notify["format"] == "slack" and p.stall_after == 1200 and p.on_stall == "cancel"
    h = config.Host(name="t", kind="ssh", ssh="t", notify={"url": "https://host/y", "format": "json",
                                                           "on": ["failed"], "host": ""}, stall_after=60)
    notify, stall = _watch(p, h, "t")
    assert notify["url"] == "https://hooks.example/x" and notify["host"] == "t"
    assert stall == {"after": 1200, "util_busy": 5, "action": "cancel"}
    notify, stall = _watch(project.Project(), h, "t")
    assert notify["url"] == "https://host/y" and stall["after"] == 60 and stall["action"] == "notify"
    for bad, needle in (("notify: {url: 'ftp://x'}\n", "'notify' must be valid"),
                        ("stall_after: soon\n", "'stall_after' must be valid"),
                        ("on_stall: kill\n", "'on_stall' must be notify or cancel")):
        with pytest.raises(ConfigError, match=needle):
            project.load(write(tmp_path, bad))
