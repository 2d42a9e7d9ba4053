"""The configured PACS endpoints: their configuration, reading instances from them (QIDO-RS, WADO-RS) and storing results to them (STOW-RS, C-STORE); torch-free."""
