"""The hand-off harness of issue 14 (docs/design/014-ownership-handoff.md): real gateway replicas
against the API-server double, fenced backend pods as processes, load, config changes, faults."""
