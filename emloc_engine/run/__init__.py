"""The run: settings, the plan, the manifest and the one orchestrator that starts and finishes stages."""
