"""The spool's alert rules in deploy/prometheus-rules.yaml, unit-tested with promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus-rules.yaml"
PROMTOOL = shutil.which("promtool")

TESTS = """
rule_files: [RULES]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'webhook_sidecar_spool_events{job="w", state="pending"}'
        values: '0+20x60'
      - series: 'webhook_sidecar_spool_events{job="w", state="dead"}'
        values: '0x10 1x50'
      - series: 'webhook_sidecar_spool_oldest_pending_age_seconds{job="w"}'
        values: '0+60x60'
    alert_rule_test:
      - eval_time: 5m
        alertname: WebhookSpoolDeadLetters
        exp_alerts: []
      - eval_time: 12m
        alertname: WebhookSpoolDeadLetters
        exp_alerts:
          - exp_labels: {job: w, severity: warning}
            exp_annotations:
              summary: "1 webhook calls are dead letters in the spool (spool list --dead)"
      - eval_time: 10m
        alertname: WebhookSpoolOldestPendingTooOld
        exp_alerts: []
      - eval_time: 40m
        alertname: WebhookSpoolBacklogGrowing
        exp_alerts:
          - exp_labels: {job: w, severity: warning}
            exp_annotations:
              summary: "800 webhook calls wait in the spool and the backlog keeps growing"
"""


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not on PATH")
def test_spool_alerts_fire_as_documented(tmp_path: Path) -> None:
    spec = tmp_path / "spool-tests.yaml"
    spec.write_text(TESTS.replace("RULES", str(RULES)))
    result = subprocess.run(
        [str(PROMTOOL), "test", "rules", str(spec)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
