"""The base every edgemart package builds on, importing nothing of ours: the one error tree (`errors`),
crash-safe file writes and fault points (`fileio`), bounded YAML (`safe_yaml`), command output (`output`,
`progress`) and the model and sample-file safety walks (`model_safety`)."""
