# SuperExec with fedlowrank installed: it runs the ServerApp (next to the SuperLink) and each
# site's ClientApp (next to its SuperNode). Flower's own image, at the pinned Flower version.
FROM flwr/superexec:1.42.0

WORKDIR /app/fedlowrank-src
# Only what the wheel needs; the apps themselves arrive as FABs with `flwr run`.
COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app fedlowrank ./fedlowrank
COPY --chown=app:app strategies ./strategies
COPY --chown=app:app clients ./clients
# torch first and pinned, so that no other requirement picks a build for it.
RUN python -m pip install --no-cache-dir "torch==2.14.1" \
    && python -m pip install --no-cache-dir . \
    && python -c "import fedlowrank.strategies, fedlowrank.clients"

WORKDIR /app
ENTRYPOINT ["flower-superexec"]
