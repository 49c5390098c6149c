"""The full preset's music and shopping apps."""
from __future__ import annotations

import random

from loopjax.envs.miniworld.apps_core import add_login
from loopjax.envs.miniworld.framework import App, I, S, find, matches, require

# ---- music ---------------------------------------------------------------------------------
MUSIC = App("music", "Music: songs, liked songs and playlists.")
add_login(MUSIC)
SONG = {"song_id": "integer", "title": "string", "artist": "string", "genre": "string",
        "duration_s": "integer", "play_count": "integer"}
PLAYLIST = {"playlist_id": "integer", "title": "string", "song_ids": "list[integer]"}
GENRES = ("pop", "rock", "jazz", "folk", "electronic")
ARTISTS = ("The Lanterns", "Nova Bay", "Iron Tulip", "Mira Sol", "Blue Harbor", "Ola Grey")
SONG_WORDS = ("Summer Rain Midnight Echo River Golden Silver Paper Neon Quiet Wild Heart City "
              "Lights Ocean Stone Fire Dream Road Home").split()


@MUSIC.api("search_songs", "Search the song catalog.",
           [S("query", "Words to match in the title or artist.", False, ""),
            S("genre", "Only this genre.", False, choices=GENRES)], SONG, paginated=True)
def search_songs(ctx, query, genre):
    return [dict(s) for s in ctx.db["songs"].values()
            if matches(query, s["title"], s["artist"]) and genre in (None, s["genre"])]


@MUSIC.api("show_song", "Show one song.", [I("song_id", "Song id.")], SONG)
def show_song(ctx, song_id):
    return dict(find(ctx.db["songs"], song_id, "song"))


@MUSIC.api("show_liked_songs", "List the supervisor's liked songs.", [], SONG, paginated=True)
def show_liked_songs(ctx):
    return [dict(ctx.db["songs"][r["song_id"]]) for r in ctx.db["likes"].values()]


@MUSIC.api("like_song", "Like a song.", [I("song_id", "Song id.")], {"message": "string"},
           method="POST")
def like_song(ctx, song_id):
    find(ctx.db["songs"], song_id, "song")
    require(all(r["song_id"] != song_id for r in ctx.db["likes"].values()), "already liked")
    lid = ctx.new_id("likes")
    ctx.db["likes"][lid] = {"like_id": lid, "song_id": song_id}
    return {"message": "Song liked."}


@MUSIC.api("unlike_song", "Remove a song from the liked songs.", [I("song_id", "Song id.")],
           {"message": "string"}, method="DELETE")
def unlike_song(ctx, song_id):
    for lid, r in list(ctx.db["likes"].items()):
        if r["song_id"] == song_id:
            del ctx.db["likes"][lid]
            return {"message": "Song unliked."}
    require(False, "that song is not liked", 404)


@MUSIC.api("search_playlists", "Search the supervisor's playlists.",
           [S("query", "Words to match in the title.", False, "")], PLAYLIST, paginated=True)
def search_playlists(ctx, query):
    return [dict(p) for p in ctx.db["playlists"].values() if matches(query, p["title"])]


@MUSIC.api("show_playlist", "Show a playlist with its songs.", [I("playlist_id", "Id.")],
           {**PLAYLIST, "songs": [SONG]})
def show_playlist(ctx, playlist_id):
    p = dict(find(ctx.db["playlists"], playlist_id, "playlist"))
    p["songs"] = [dict(ctx.db["songs"][s]) for s in p["song_ids"]]
    return p


@MUSIC.api("create_playlist", "Create an empty playlist.", [S("title", "Title.", min_length=1)],
           {"playlist_id": "integer"}, method="POST")
def create_playlist(ctx, title):
    pid = ctx.new_id("playlists")
    ctx.db["playlists"][pid] = {"playlist_id": pid, "title": title, "song_ids": []}
    return {"playlist_id": pid}


@MUSIC.api("add_song_to_playlist", "Add a song to a playlist.",
           [I("playlist_id", "Playlist id."), I("song_id", "Song id.")], {"message": "string"},
           method="POST")
def add_song_to_playlist(ctx, playlist_id, song_id):
    p = find(ctx.db["playlists"], playlist_id, "playlist")
    find(ctx.db["songs"], song_id, "song")
    require(song_id not in p["song_ids"], "the song is already in the playlist")
    p["song_ids"] = p["song_ids"] + [song_id]
    return {"message": "Song added."}


@MUSIC.api("remove_song_from_playlist", "Remove a song from a playlist.",
           [I("playlist_id", "Playlist id."), I("song_id", "Song id.")], {"message": "string"},
           method="DELETE")
def remove_song_from_playlist(ctx, playlist_id, song_id):
    p = find(ctx.db["playlists"], playlist_id, "playlist")
    require(song_id in p["song_ids"], "the song is not in the playlist", 404)
    p["song_ids"] = [s for s in p["song_ids"] if s != song_id]
    return {"message": "Song removed."}


@MUSIC.api("delete_playlist", "Delete a playlist.", [I("playlist_id", "Playlist id.")],
           {"message": "string"}, method="DELETE")
def delete_playlist(ctx, playlist_id):
    find(ctx.db["playlists"], playlist_id, "playlist")
    del ctx.db["playlists"][playlist_id]
    return {"message": "Playlist deleted."}


def music_data(rng: random.Random) -> dict:
    titles = sorted({f"{a} {b}" for a in SONG_WORDS for b in SONG_WORDS if a < b})  # no "B A" twin
    songs = {i: {"song_id": i, "title": t, "artist": rng.choice(ARTISTS),
                 "genre": rng.choice(GENRES), "duration_s": rng.randrange(120, 360),
                 "play_count": rng.randrange(10, 5000)}
             for i, t in enumerate(rng.sample(titles, 40), start=1)}
    likes = {i: {"like_id": i, "song_id": s} for i, s in enumerate(rng.sample(sorted(songs), 8), 1)}
    playlists = {i: {"playlist_id": i, "title": t, "song_ids": rng.sample(sorted(songs), 4)}
                 for i, t in enumerate(("Morning Run", "Focus", "Road Trip", "Dinner Jazz"), 1)}
    return {"songs": songs, "likes": likes, "playlists": playlists}


# ---- shopping ------------------------------------------------------------------------------
SHOP = App("shopping", "Shopping: products, a cart, and orders paid with the supervisor's cards.")
add_login(SHOP)
PRODUCT = {"product_id": "integer", "name": "string", "category": "string", "price": "number",
           "stock": "integer"}
ORDER = {"order_id": "integer", "items": "list", "total": "number", "status": "string",
         "payment_card_id": "integer", "address_id": "integer"}
PRODUCTS = ("lamp mug kettle notebook backpack umbrella headphones blender pillow candle "
            "teapot scarf charger keyboard bottle").split()


@SHOP.api("search_products", "Search products.",
          [S("query", "Words to match in the name.", False, ""),
           S("category", "Only this category.", False, choices=("home", "office", "travel"))],
          PRODUCT, paginated=True)
def search_products(ctx, query, category):
    return [dict(p) for p in ctx.db["products"].values()
            if matches(query, p["name"]) and category in (None, p["category"])]


@SHOP.api("show_product", "Show one product.", [I("product_id", "Product id.")], PRODUCT)
def show_product(ctx, product_id):
    return dict(find(ctx.db["products"], product_id, "product"))


@SHOP.api("show_cart", "Show the cart.", [], {"product_id": "integer", "quantity": "integer"})
def show_cart(ctx):
    return [dict(c) for c in ctx.db["cart"].values()]


@SHOP.api("add_to_cart", "Add a product to the cart.",
          [I("product_id", "Product id."), I("quantity", "How many.", False, 1, ge=1, le=10)],
          {"message": "string"}, method="POST")
def add_to_cart(ctx, product_id, quantity):
    p = find(ctx.db["products"], product_id, "product")
    require(p["stock"] >= quantity, f"only {p['stock']} in stock")
    cid = ctx.new_id("cart")
    ctx.db["cart"][cid] = {"cart_item_id": cid, "product_id": product_id, "quantity": quantity}
    return {"message": "Added to cart."}


@SHOP.api("clear_cart", "Empty the cart.", [], {"message": "string"}, method="DELETE")
def clear_cart(ctx):
    ctx.db["cart"].clear()
    return {"message": "Cart emptied."}


@SHOP.api("place_order", "Order everything in the cart.",
          [I("payment_card_id", "Supervisor card to pay with."),
           I("address_id", "Supervisor address to ship to.")], {"order_id": "integer",
          "total": "number"}, method="POST")
def place_order(ctx, payment_card_id, address_id):
    require(len(ctx.db["cart"]) > 0, "the cart is empty")
    card = find(ctx.state["supervisor"]["cards"], payment_card_id, "payment card")
    find(ctx.state["supervisor"]["addresses"], address_id, "address")
    items = [{"product_id": c["product_id"], "quantity": c["quantity"]}
             for c in ctx.db["cart"].values()]
    total = round(sum(ctx.db["products"][i["product_id"]]["price"] * i["quantity"]
                      for i in items), 2)
    require(card["balance"] >= total, "insufficient card balance")
    card["balance"] = round(card["balance"] - total, 2)
    for i in items:
        ctx.db["products"][i["product_id"]]["stock"] -= i["quantity"]
    oid = ctx.new_id("orders")
    ctx.db["orders"][oid] = {"order_id": oid, "items": items, "total": total,
                             "status": "placed", "payment_card_id": payment_card_id,
                             "address_id": address_id}
    ctx.db["cart"].clear()
    return {"order_id": oid, "total": total}


@SHOP.api("search_orders", "List orders, newest first.",
          [S("status", "placed, delivered or cancelled.", False,
             choices=("placed", "delivered", "cancelled"))], ORDER, paginated=True)
def search_orders(ctx, status):
    return [dict(o) for o in sorted(ctx.db["orders"].values(), key=lambda o: -o["order_id"])
            if status in (None, o["status"])]


@SHOP.api("cancel_order", "Cancel a placed order; the card is refunded.",
          [I("order_id", "Order id.")], {"message": "string"}, method="POST")
def cancel_order(ctx, order_id):
    o = find(ctx.db["orders"], order_id, "order")
    require(o["status"] == "placed", f"only placed orders can be cancelled (this one is "
            f"{o['status']})")
    o["status"] = "cancelled"
    card = ctx.state["supervisor"]["cards"][o["payment_card_id"]]
    card["balance"] = round(card["balance"] + o["total"], 2)
    return {"message": "Order cancelled."}


def shopping_data(rng: random.Random) -> dict:
    products = {i: {"product_id": i, "name": f"{color} {name}", "category": cat,
                    "price": rng.randrange(5, 90), "stock": rng.randrange(2, 30)}
                for i, (color, name, cat) in enumerate(
                    [(c, n, rng.choice(("home", "office", "travel")))
                     for n in PRODUCTS for c in ("Red", "Green", "Black")], start=1)}
    orders = {i: {"order_id": i, "items": [{"product_id": rng.choice(sorted(products)),
                                            "quantity": 1}],
                  "total": 0, "status": rng.choice(("placed", "delivered")),
                  "payment_card_id": 1, "address_id": 1} for i in range(1, 6)}
    for o in orders.values():
        o["total"] = products[o["items"][0]["product_id"]]["price"]
    return {"products": products, "cart": {}, "orders": orders}


REGISTRY = {"music": (MUSIC, lambda rng, ppl, pre: music_data(rng)),
            "shopping": (SHOP, lambda rng, ppl, pre: shopping_data(rng))}
