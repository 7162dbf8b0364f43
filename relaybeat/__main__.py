from relaybeat.cli import app

app(prog_name="relaybeat")
