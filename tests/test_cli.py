"""The fedlowrank command: help, subcommands, and the run-config check."""

import subprocess
import sys

import pytest

from fedlowrank.cli import main
from fedlowrank.cli.runner import parse_run_config


def test_help_lists_the_commands_and_python_dash_m_works():
    done = subprocess.run([sys.executable, "-m", "fedlowrank", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and all(c in done.stdout for c in ("run", "report", "certs"))
    done = subprocess.run(["fedlowrank", "run", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--deployment" in done.stdout and "--secure" in done.stdout
    # It names the apps and where their run-config keys are documented.
    assert "adult-married, fairlora-images" in done.stdout and "[tool.flwr.app.config]" in done.stdout
    done = subprocess.run(["fedlowrank", "certs", "--help"], capture_output=True, text=True)
    assert all(f"--{option}" in done.stdout for option in ("sites", "hostname", "days")) and "site-1" in done.stdout


def test_a_deployment_turns_central_evaluation_off_unless_asked():
    from fedlowrank.cli.runner import with_default

    assert with_default("num-server-rounds=3", "central-evaluation", "false") == "central-evaluation=false num-server-rounds=3"
    assert with_default("central-evaluation=true", "central-evaluation", "false") == "central-evaluation=true"


def test_unknown_command_and_misspelled_run_config_key_are_named(capsys):
    assert main(["bogus"]) == 2 and "unknown command 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="'num-server-round' \\(did you mean 'num-server-rounds'\\?\\)"):
        main(["run", "adult-married", "--run-config", "num-server-round=3"])


def test_run_config_is_parsed_as_flower_does():
    from flwr.common.config import parse_config_args

    text = "num-server-rounds=3 strategy='fedit' lr=0.01 client-ranks='2,4,8' results-file='/tmp/a b.json' robust=''"
    assert parse_run_config(text) == parse_config_args([text])


def test_certs_makes_a_ca_a_server_certificate_and_node_keys(tmp_path):
    main(["certs", str(tmp_path), "--sites", "2", "--days", "1"])
    assert {p.name for p in (tmp_path / "certificates").iterdir()} == {"ca.crt", "server.pem", "server.key"}
    assert {p.name for p in (tmp_path / "keys").iterdir()} == {"site-1.key", "site-1.pub", "site-2.key", "site-2.pub"}
    assert (tmp_path / "keys" / "site-1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


def test_a_simulation_that_needs_a_missing_extra_is_refused_before_it_starts(monkeypatch):
    import importlib.util

    from fedlowrank.cli.runner import HERE, missing_extras

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("opacus", "monai") else real(name, *a))
    assert missing_extras(HERE / "adult-married", "num-server-rounds=2") == []
    assert missing_extras(HERE / "adult-married", "dp-noise-multiplier=1.0") == ["dp"]
    assert missing_extras(HERE / "fairlora-images", "dp-noise-multiplier=1.0") == ["dp", "imaging"]
    with pytest.raises(SystemExit, match=r"needs the \[dp\] extra: pip install 'fedlowrank\[dp\]'"):
        main(["run", "adult-married", "--run-config", "dp-noise-multiplier=1.0"])
    # The imaging app's digits fallback reads scikit-learn's digits: part of [imaging].
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    assert missing_extras(HERE / "fairlora-images", "dataset='digits'") == ["imaging"]
    assert missing_extras(HERE / "fairlora-images", "") == []


def test_certs_again_keeps_the_ca_and_the_site_keys_and_issues_a_server_certificate_for_a_new_name(tmp_path):
    from cryptography import x509

    main(["certs", str(tmp_path), "--sites", "2", "--days", "1"])
    ca, site_key = (tmp_path / "certificates" / "ca.crt").read_bytes(), (tmp_path / "keys" / "site-1.key").read_bytes()
    assert oct((tmp_path / "ca" / "ca.key").stat().st_mode & 0o777) == "0o600"
    main(["certs", str(tmp_path), "--sites", "3", "--days", "1", "--hostname", "new.example.org"])
    assert (tmp_path / "certificates" / "ca.crt").read_bytes() == ca  # sites keep their ca.crt
    assert (tmp_path / "keys" / "site-1.key").read_bytes() == site_key and (tmp_path / "keys" / "site-3.key").exists()
    server = x509.load_pem_x509_certificate((tmp_path / "certificates" / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "new.example.org" in names
    server.verify_directly_issued_by(x509.load_pem_x509_certificate(ca))  # signed by the same CA


def _stream_of(script: str, grace_s: float):
    import time

    from fedlowrank.cli.runner import Stream

    stream = Stream(grace_s=grace_s)
    start = time.monotonic()
    code, run_id = stream([sys.executable, "-c", script], env={})
    return stream, stream.outcome(code, run_id, {}), time.monotonic() - start


def test_a_run_whose_serverapp_ended_is_not_held_by_a_hung_site(capsys):
    """Flower's simulation waits for every ClientApp it started; the runner stops it once the
    ServerApp's last line is ``grace`` seconds old, and the run is what the ServerApp made of it."""
    done = ("import time; print('INFO : results written to r.json, final adapter to r.adapter.safetensors', flush=True);"
            "time.sleep(600)")
    stream, code, seconds = _stream_of(done, grace_s=1.0)
    assert stream.stopped_hung and code == 0 and seconds < 30
    assert "(a hung site was stopped after the ServerApp ended)" in capsys.readouterr().out
    failed = "import time; print('fedlowrank.results.RunFailed: every site failed: X', flush=True); time.sleep(600)"
    stream, code, seconds = _stream_of(failed, grace_s=1.0)
    assert stream.stopped_hung and code == 1 and stream.failure == "every site failed: X" and seconds < 30


def test_a_run_that_ends_on_its_own_is_not_stopped():
    stream, code, _ = _stream_of("print('INFO : results written to r.json, final adapter to a')", grace_s=0.5)
    assert not stream.stopped_hung and stream.server_finished and code == 0


def test_the_last_exception_of_a_failed_serverapp_and_the_results_path_are_kept():
    traceback = ("import time; print('Traceback (most recent call last):'); print('  File \"x.py\", line 1');"
                 "print('RuntimeError: stop-after-round = 3: stopping the ServerApp as a crash would; resume with ...')")
    stream, _, _ = _stream_of(traceback, grace_s=30)
    assert stream.error == "RuntimeError: stop-after-round = 3: stopping the ServerApp as a crash would; resume with ..."
    stream, _, _ = _stream_of("print('INFO : results written to results/a b.json, final adapter to x')", grace_s=30)
    assert stream.results == "results/a b.json"
