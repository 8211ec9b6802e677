"""One ``QWizardPage`` per step of the wizard."""
